"""Everything that persists: the database (engine, models, repository, migrations), the blob
store, the derived vector index and the integrity check. The only package that speaks SQL."""
