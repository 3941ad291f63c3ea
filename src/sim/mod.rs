//! The Acumatica simulator: a real identity server for tests, benchmarks and `acutoken demo`.
