"""Running a worker: the composition root, claiming rows, running each image, and what a
run does about bandwidth, outages and leftovers."""
