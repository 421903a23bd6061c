"""distbp: data-parallel NumPy backpropagation over MPI with HDF5 datasets and checkpoints."""

__version__ = "0.1.0"
