//! Pure renewal decisions.
