"""The method's steps over a lab: intake of images, ingest, resynthesis, query, attribution."""
