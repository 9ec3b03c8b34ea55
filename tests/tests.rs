//! The integration suite: one binary. Each module is a part of the specification.
mod suite;
mod support;
