"""The queue of jobs, their registry, status files, side jobs, and what the page shows of them."""
