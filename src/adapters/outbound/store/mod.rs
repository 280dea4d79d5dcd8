//! VM record stores behind the `VmStore` port.

pub mod memory;
pub mod sqlite;
