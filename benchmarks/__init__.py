"""Side-by-side benchmarks; results with their commands in benchmarks/results/."""
