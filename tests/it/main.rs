//! The integration-test binary: one binary, one module per area.

mod fake_fc;
mod firecracker;
mod real_fc;
