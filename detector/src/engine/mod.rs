//! Correlation engine: pure, events in, verdicts out (being written).
