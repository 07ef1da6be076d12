"""Data for tests and benchmarks that a package user can build too: synthetic stores with known structure
(``synthstore``) and tiny on-disk datasets in each supported layout (``fakedata``). Nothing here downloads."""
