"""What is fitted on the lab's own references: prediction sets and the fused weights."""
