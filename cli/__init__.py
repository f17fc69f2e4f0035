"""Command-line front ends. They only parse arguments and call the featcache / maskfer libraries."""
