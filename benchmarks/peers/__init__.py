"""Other ways to run the row (c) workload, each the fairest version its users would write."""
