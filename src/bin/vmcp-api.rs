//! `vmcp-api`: the VMCP service binary. Configuration comes from
//! `UNKEY_VMCP_*` environment variables only; the command line takes nothing
//! but `--help` and `--version`, and anything else is refused (exit 2) before
//! a runtime starts or a port is bound.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Command;
use vmcp::app::config::VARIABLES;

/// `0.1.0 (git 1a2b3c4d5e6f)`.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("VMCP_GIT_REVISION"),
    ")"
);

fn main() -> ExitCode {
    // --help and --version print and exit 0; any other argument exits 2 with a usage line.
    // Without arguments (how the service runs) the parser is not built at all: its code and
    // the help text would stay resident for the process's life (BENCHMARKS.md, idle RSS).
    if std::env::args_os().len() > 1 {
        command().get_matches();
    }
    serve()
}

#[tokio::main]
async fn serve() -> ExitCode {
    vmcp::app::run::run().await
}

fn command() -> Command {
    Command::new("vmcp-api")
        .version(VERSION)
        .about(
            "VMCP, the VMM Control Plane: runs VMs on this host through Cloud Hypervisor or \
             Firecracker (one supervised VMM process per VM) behind one ConnectRPC API, \
             vmm.v1.VmService. VMs keep running when vmcp-api stops and are re-adopted when \
             it starts again. Use vmcpctl to talk to it.",
        )
        .after_help(environment_help())
}

/// Every variable with its default and meaning, from the table the configuration reads.
fn environment_help() -> String {
    let mut help = String::from(
        "Configuration is read from these environment variables only; a bad value stops \
         start-up naming the variable, and unknown UNKEY_VMCP_* variables are logged.\n\n\
         Environment:\n",
    );
    for v in VARIABLES {
        // Writing to a String cannot fail.
        let _ = writeln!(
            help,
            "  {}  [default: {}]\n      {}",
            v.full_name(),
            v.default,
            v.about
        );
    }
    help.push_str(
        "\nDocumentation: README.md and docs/SECURITY.md in the source tree, installed by \
         `make install` under <prefix>/share/doc/vmcp; `man vmcpctl` for the client.",
    );
    help
}
