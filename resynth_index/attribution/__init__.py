"""How an answer is made, in one direction: evidence -> combination -> calibration -> verdict.

  answer        the answer record (``QueryResult``), its verdict words and notes: the bottom
  evidence/     one module per signal: resynthesis distance, layer distances, reconstruction
  verdict       from a signal's distances to a ranking, scores, margin and verdict with its reason
  combination   several signals z-scored and weighted into one ranking (the fused method)
  calibration/  fitted on the lab's references: conformal prediction sets (temperature,
                thresholds), which calibration applies to a query, the fused weights

Nothing here imports the stages above it (``pipeline``, ``evaluation``, the commands); a
stage gathers the data, calls these, and builds the answer, which no one changes afterwards:
a function that adds to an answer returns a new one.
"""
