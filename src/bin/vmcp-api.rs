//! `vmcp-api`: the VMCP service binary. Configuration comes from
//! `UNKEY_VMCP_*` environment variables; see the README.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    vmcp::app::run::run().await
}
