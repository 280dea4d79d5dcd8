//! The command line, declared once with clap's derive API: `--help`, the
//! shell completions and the man page are all generated from these types.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::exit_codes_help;
use crate::parse::{self, DiskSpec, NetSpec};

/// `0.1.0 (git 1a2b3c4d5e6f)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("VMCP_GIT_REVISION"),
    ")"
);

/// vmcpctl talks to VMCP (vmcp-api) over its ConnectRPC API, vmm.v1.VmService.
#[derive(Debug, Parser)]
#[command(name = "vmcpctl", version = VERSION, after_help = exit_codes_help())]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Output format: aligned tables for people, or JSON (one document per call, in the
    /// API's proto3 JSON) for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true,
          help_heading = "Global options")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the server.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Connection {
    /// Where vmcp-api listens: http://HOST:PORT, https://HOST:PORT, or unix:///PATH for
    /// the host-local socket (the server's UNKEY_VMCP_API_SOCKET).
    #[arg(
        long,
        env = "VMCP_ADDRESS",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub address: String,
    /// File holding the bearer token to send (the server's UNKEY_VMCP_AUTH_TOKEN_FILE).
    #[arg(long, env = "VMCP_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that the server's certificate must chain to (https:// only; the
    /// system trust store is not read).
    #[arg(long, env = "VMCP_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (the server's UNKEY_VMCP_TLS_CLIENT_CA_FILE).
    #[arg(long, env = "VMCP_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "VMCP_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Deadline of one API call (e.g. 30s, 2m).
    #[arg(long, env = "VMCP_REQUEST_TIMEOUT", default_value = "60s",
          value_parser = parse::duration, global = true)]
    pub request_timeout: Duration,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// The API's proto3 JSON.
    Json,
}

/// The subcommands: the VM calls, plus completions and the man page.
#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Vm(Box<VmCommand>),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write it and one page per subcommand to a directory.
    Man {
        /// Write vmcpctl.1 and vmcpctl-<subcommand>.1 here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// One subcommand per RPC.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from flags, or from a JSON or YAML file in the API's schema.
    Create(CreateArgs),
    /// Boot a created or shut-down VM.
    Boot(VmArgs),
    /// Shut a VM down: ACPI power button (Ctrl-Alt-Del on Firecracker), then a hard stop
    /// after the grace period.
    Shutdown(ShutdownArgs),
    /// Pause a running VM.
    Pause(VmArgs),
    /// Resume a paused VM.
    Resume(VmArgs),
    /// Reboot a VM.
    Reboot(RebootArgs),
    /// Delete a VM and end its VMM.
    Delete(DeleteArgs),
    /// Show one VM: state, configuration, metrics, backend details.
    Info(VmArgs),
    /// List VMs, ordered by id.
    List(ListArgs),
    /// Follow changes of VMs as they happen (WatchVms), until interrupted (Ctrl-C).
    #[command(after_help = WATCH_HELP)]
    Watch(WatchArgs),
    /// Print a VM's serial console output (GetConsoleOutput), or follow it (StreamConsole).
    #[command(after_help = CONSOLE_HELP)]
    Console(ConsoleArgs),
    /// Change a running VM's vCPUs or memory within the hot-plug ceilings it was created with.
    Resize(ResizeArgs),
    /// Take, list, show and delete snapshots.
    Snapshot(crate::snapshot::SnapshotArgs),
    /// Start a new VM from a snapshot (RestoreVm): it continues where the snapshot was taken.
    Restore(crate::snapshot::RestoreArgs),
}

/// `console --help`, after the flags.
const CONSOLE_HELP: &str = "\
The bytes are written to stdout as the guest wrote them. Output older than the server's
console cap is gone; what is kept starts at the oldest byte. With --follow, a console that
starts over (a new VMM process) goes on from its beginning; the command ends when the VM is
deleted, and follows again from where it was when the server restarts.";

/// `console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The VM's id.
    pub vm_id: String,
    /// Keep printing what the guest writes, like `tail -f`, until the VM is deleted or Ctrl-C.
    #[arg(short, long)]
    pub follow: bool,
    /// Start at this byte offset of the console (0: the oldest byte kept).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
}

/// `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The VM's id.
    pub vm_id: String,
    /// The new number of vCPUs (up to the VM's --max-vcpus).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub vcpus: Option<u16>,
    /// The new memory size (e.g. 1GiB; up to the VM's --max-memory).
    #[arg(long, value_parser = parse::memory)]
    pub memory: Option<u64>,
}

/// `watch --help`, after the flags.
const WATCH_HELP: &str = "\
One line per message: TYPE (ADDED, CHANGED, DELETED, or SYNCED once everything up to REVISION
has been sent), ID, STATE, REVISION and REASON; heartbeats are not shown. With -o json, one
WatchVmsResponse per line in the API's proto3 JSON, heartbeats included.

When the server goes away (a restart) or drops a watcher that fell behind, vmcpctl watches again
from the highest revision it has printed, after a short backoff, so no change is missed or
printed twice. A revision the server no longer keeps exits 4: list again (`list -o json` prints
a `revision` to watch --since), or use --initial.";

/// A VM, and whether to wait for a state.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// The VM's id.
    pub vm_id: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `--wait [STATE] --timeout D`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// After the call, block until the VM is in STATE (default: the state the command
    /// leads to; running for info). Exits 8 when --timeout passes first, 4 when the VM fails instead, 3
    /// when the VM does not exist (unless waiting for `deleted`).
    #[arg(long, value_enum, value_name = "STATE", num_args = 0..=1)]
    pub wait: Option<Option<WaitState>>,
    /// How long --wait waits (e.g. 90s, 5m; 0 checks once).
    #[arg(long, default_value = "60s", value_parser = parse::duration, requires = "wait")]
    pub timeout: Duration,
}

/// A state `--wait` can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WaitState {
    /// Created, not booted (or stopped in a VMM that stays).
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Shut down.
    Shutdown,
    /// Failed (only deletion is possible then).
    Failed,
    /// Gone: deleted, or never existed.
    Deleted,
}

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's id (the server generates one when omitted).
    pub vm_id: Option<String>,
    /// Read the configuration from this file ("-" for stdin): JSON (.json) or YAML, either
    /// a VmConfig or a whole CreateVmRequest ({"vmId": ..., "config": ...}), in the API's
    /// proto3 JSON field names. Unknown fields are refused.
    #[arg(long, short, value_name = "FILE", conflicts_with_all = [
        "vcpus", "memory", "kernel", "initrd", "cmdline", "disks", "nets", "metadata", "console",
        "restart_policy", "track_dirty_pages"
    ])]
    pub file: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub vcpus: u8,
    /// Memory: a number of MiB, or with a unit (512MiB, 2GiB, 2G).
    #[arg(long, default_value = "512MiB", value_parser = parse::memory)]
    pub memory: u64,
    /// Kernel image (absolute path on the VMCP host).
    #[arg(long, value_name = "PATH", required_unless_present = "file")]
    pub kernel: Option<String>,
    /// Initramfs (absolute path on the VMCP host).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Option<String>,
    /// A disk: PATH[,ro][,root][,id=ID] (repeatable; ids default to disk0, disk1, ...).
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse::disk)]
    pub disks: Vec<DiskSpec>,
    /// A network interface on a tap: TAP[,MAC][,id=ID] (repeatable; ids default to eth0, ...).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse::net)]
    pub nets: Vec<NetSpec>,
    /// A metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub metadata: Vec<(String, String)>,
    /// Record the serial console (its output path is in `info`).
    #[arg(long)]
    pub console: bool,
    /// Track the pages the guest writes, for diff snapshots (Firecracker only; a small cost
    /// to the guest).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// What VMCP does when the VM's VMM goes away unasked (default: the host's
    /// UNKEY_VMCP_DEFAULT_RESTART_POLICY, itself never).
    #[arg(long, value_enum, value_name = "POLICY")]
    pub restart_policy: Option<RestartPolicy>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `create --restart-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestartPolicy {
    /// A VMM that dies leaves the VM FAILED.
    Never,
    /// Boot it again when its VMM is killed or exits non-zero, or vanished with the host.
    OnFailure,
    /// As on-failure, and also after the guest powered off or reset.
    Always,
}

/// `shutdown`.
#[derive(Debug, Args)]
pub struct ShutdownArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Stop at once, without asking the guest.
    #[arg(long)]
    pub force: bool,
    /// Seconds the guest gets to power off before the hard stop (server default: 30).
    #[arg(long, value_name = "SECONDS")]
    pub grace: Option<u16>,
}

/// `reboot`.
#[derive(Debug, Args)]
pub struct RebootArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Reset without asking the guest (Firecracker; Cloud Hypervisor always resets).
    #[arg(long)]
    pub force: bool,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// End the VMM at once instead of after a grace period.
    #[arg(long)]
    pub force: bool,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only VMs in this state (repeatable).
    #[arg(long = "state", value_enum)]
    pub states: Vec<ListState>,
    /// VMs per page (server default 100, at most 1000).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub page_size: Option<u16>,
    /// Continue from this page token (printed by the previous page).
    #[arg(long, conflicts_with = "all")]
    pub page_token: Option<String>,
    /// Follow every page and print all VMs as one list (its `revision` is the first page's:
    /// watch from this revision to follow the host from the list on).
    #[arg(long)]
    pub all: bool,
}

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only these VMs (all VMs when none is named).
    #[arg(value_name = "VM_ID")]
    pub vm_ids: Vec<String>,
    /// Only changes that bring a VM into, or take it out of, this state (repeatable).
    #[arg(long = "state", value_enum)]
    pub states: Vec<ListState>,
    /// First replay every change after this revision (the `revision` of `list -o json`, or
    /// the last one a watch printed); without it, only changes from now on.
    #[arg(long, value_name = "REV", conflicts_with = "initial")]
    pub since: Option<u64>,
    /// First print every matching VM as ADDED, then SYNCED, then the changes.
    #[arg(long)]
    pub initial: bool,
}

/// A state `list --state` can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListState {
    Created,
    Running,
    Paused,
    Shutdown,
    Failed,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wait_takes_an_optional_state() {
        let cli = Cli::try_parse_from(["vmcpctl", "boot", "web-1", "--wait"]).expect("parses");
        let Command::Vm(command) = cli.command else {
            panic!("a VM command")
        };
        let VmCommand::Boot(args) = *command else {
            panic!("boot")
        };
        assert_eq!(args.wait.wait, Some(None));
        let cli =
            Cli::try_parse_from(["vmcpctl", "info", "web-1", "--wait", "paused"]).expect("parses");
        let Command::Vm(command) = cli.command else {
            panic!("a VM command")
        };
        let VmCommand::Info(args) = *command else {
            panic!("info")
        };
        assert_eq!(args.wait.wait, Some(Some(WaitState::Paused)));
        assert!(
            Cli::try_parse_from(["vmcpctl", "info", "web-1", "--timeout", "5s"]).is_err(),
            "--timeout without --wait is a usage error"
        );
    }

    #[test]
    fn create_needs_a_kernel_or_a_file_but_not_both() {
        assert!(Cli::try_parse_from(["vmcpctl", "create", "a"]).is_err());
        assert!(Cli::try_parse_from(["vmcpctl", "create", "a", "--kernel", "/k"]).is_ok());
        assert!(Cli::try_parse_from(["vmcpctl", "create", "a", "-f", "vm.yaml"]).is_ok());
        assert!(
            Cli::try_parse_from(["vmcpctl", "create", "a", "-f", "vm.yaml", "--vcpus", "2"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "vmcpctl",
            "create",
            "a",
            "--kernel",
            "/k",
            "--track-dirty-pages",
        ])
        .expect("parses");
        let Command::Vm(vm) = cli.command else {
            panic!("a VM call");
        };
        let VmCommand::Create(args) = *vm else {
            panic!("create");
        };
        let req = crate::create::request(&args).expect("request");
        assert!(req.config.memory.track_dirty_pages);
    }
}
