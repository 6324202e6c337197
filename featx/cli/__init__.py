"""The ``featx`` command line: click commands that parse, call one library function and print; ``FeatxError``
becomes one line and its exit code here, and nowhere else."""
