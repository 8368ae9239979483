"""The typed matrix: `matrix.yaml` loaded and validated once, shared by images, trainer and bench."""

from matrix.errors import MatrixError, Problem
from matrix.load import DEFAULT_MATRIX_PATH, load_matrix
from matrix.schema import Matrix, ResolvedRecipe

__all__ = ["DEFAULT_MATRIX_PATH", "Matrix", "MatrixError", "Problem", "ResolvedRecipe", "load_matrix"]
