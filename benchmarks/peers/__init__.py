"""Other ways to run the bench_mf job, each as a careful user of that system would write it."""
