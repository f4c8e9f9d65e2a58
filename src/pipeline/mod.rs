//! The generate recipe.
