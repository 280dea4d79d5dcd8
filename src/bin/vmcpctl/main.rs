//! `vmcpctl`: the operator's command line for VMCP. One subcommand per RPC
//! of `vmm.v1.VmService`, sent with the project's own generated Connect
//! client; tables for people, JSON for scripts, `--wait` for a state, and
//! an exit code per error class (see `vmcpctl --help`).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use connectrpc::ConnectError;
use connectrpc::client::CallOptions;
use vmcp::proto::vmm::v1 as pb;

mod cli;
mod connect;
mod console;
mod create;
mod error;
mod output;
mod parse;
mod snapshot;
mod wait;
mod watch;

use cli::{Cli, Command, ListArgs, ListState, VmArgs, VmCommand, WaitArgs, WaitState};
use connect::Client;
use error::CtlError;
use output::Printer;
use wait::{Reached, wait_for};

fn main() -> ExitCode {
    // Usage errors exit 2 here, --help and --version exit 0.
    let cli = Cli::parse();
    let printer = Printer { output: cli.output };
    let result = match cli.command {
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(dir.as_deref()),
        Command::Vm(command) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async {
                // A watch lasts until interrupted: no --request-timeout on it.
                let streams = match &*command {
                    VmCommand::Watch(_) => true,
                    VmCommand::Console(args) => args.follow,
                    _ => false,
                };
                let client = if streams {
                    connect::streaming_client(&cli.connection)?
                } else {
                    connect::client(&cli.connection)?
                };
                run(&client, printer, *command).await
            }),
            Err(e) => Err(CtlError::Runtime(e)),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            if code != error::OK {
                // Nothing is left to report to if stderr is gone too.
                let _ = writeln!(std::io::stderr(), "vmcpctl: {e}");
            }
            ExitCode::from(code)
        }
    }
}

fn completions(shell: clap_complete::Shell) -> Result<(), CtlError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "vmcpctl", &mut script);
    Printer::raw(&script)
}

/// The man pages, from the same definitions as `--help`; the exit codes get a
/// section of their own (clap_mangen would reflow the table into one paragraph).
fn man(dir: Option<&Path>) -> Result<(), CtlError> {
    let cmd = Cli::command()
        .after_help(None::<&str>)
        .disable_help_subcommand(true);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .map_err(CtlError::Output)?;
    page.extend_from_slice(error::exit_codes_roff().as_bytes());
    let Some(dir) = dir else {
        return Printer::raw(&page);
    };
    let written = clap_mangen::generate_to(cmd, dir)
        .and_then(|()| std::fs::write(dir.join("vmcpctl.1"), &page));
    written.map_err(|e| CtlError::Usage(format!("man --dir {}: {e}", dir.display())))
}

/// Sends the subcommand's call, waits if asked, prints the answer.
async fn run(client: &Client, printer: Printer, command: VmCommand) -> Result<(), CtlError> {
    match command {
        VmCommand::Create(args) => {
            let request = create::request(&args)?;
            let mut resp = client.create_vm(request).await?.into_owned();
            if let Some(info) = wait(client, &resp.vm_id, &args.wait, WaitState::Created).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &resp.vm_id, &resp.state)
        }
        VmCommand::Boot(vm) => {
            let req = pb::BootVmRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            };
            let mut resp = client.boot_vm(req).await?.into_owned();
            if let Some(info) = wait(client, &vm.vm_id, &vm.wait, WaitState::Running).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &vm.vm_id, &resp.state)
        }
        VmCommand::Shutdown(args) => {
            let vm = &args.vm;
            let req = pb::ShutdownVmRequest {
                vm_id: vm.vm_id.clone(),
                force: args.force,
                timeout_seconds: args.grace.map_or(0, i32::from),
                ..Default::default()
            };
            // The call lasts as long as the guest's grace period; give it that on top.
            let grace = std::time::Duration::from_secs(args.grace.map_or(30, u64::from));
            let options = CallOptions::default()
                .with_timeout(client.config().default_timeout().unwrap_or_default() + grace);
            let mut resp = client
                .shutdown_vm_with_options(req, options)
                .await?
                .into_owned();
            if let Some(info) = wait(client, &vm.vm_id, &vm.wait, WaitState::Shutdown).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &vm.vm_id, &resp.state)
        }
        VmCommand::Pause(vm) => {
            let req = pb::PauseVmRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            };
            let mut resp = client.pause_vm(req).await?.into_owned();
            if let Some(info) = wait(client, &vm.vm_id, &vm.wait, WaitState::Paused).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &vm.vm_id, &resp.state)
        }
        VmCommand::Resume(vm) => {
            let req = pb::ResumeVmRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            };
            let mut resp = client.resume_vm(req).await?.into_owned();
            if let Some(info) = wait(client, &vm.vm_id, &vm.wait, WaitState::Running).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &vm.vm_id, &resp.state)
        }
        VmCommand::Reboot(args) => {
            let vm = &args.vm;
            let req = pb::RebootVmRequest {
                vm_id: vm.vm_id.clone(),
                force: args.force,
                ..Default::default()
            };
            let mut resp = client.reboot_vm(req).await?.into_owned();
            if let Some(info) = wait(client, &vm.vm_id, &vm.wait, WaitState::Running).await? {
                resp.state = info.state;
            }
            printer.vm_state(&resp, &vm.vm_id, &resp.state)
        }
        VmCommand::Delete(args) => {
            let vm = &args.vm;
            let req = pb::DeleteVmRequest {
                vm_id: vm.vm_id.clone(),
                force: args.force,
                ..Default::default()
            };
            let resp = client.delete_vm(req).await?.into_owned();
            wait(client, &vm.vm_id, &vm.wait, WaitState::Deleted).await?;
            printer.deleted(&resp, &vm.vm_id)
        }
        VmCommand::Info(vm) => info(client, printer, &vm).await,
        VmCommand::List(args) => printer.list(&list(client, &args).await?),
        VmCommand::Watch(args) => watch::run(client, printer.output, &args).await,
        VmCommand::Console(args) => console::run(client, &args).await,
        VmCommand::Snapshot(args) => snapshot::run(client, printer, args.command).await,
        VmCommand::Restore(args) => snapshot::restore(client, printer, args).await,
        VmCommand::Resize(args) => {
            if args.vcpus.is_none() && args.memory.is_none() {
                return Err(CtlError::Usage(
                    "resize: name --vcpus, --memory or both".to_owned(),
                ));
            }
            let req = pb::ResizeVmRequest {
                vm_id: args.vm_id.clone(),
                vcpu_count: args.vcpus.map_or(0, i32::from),
                memory_bytes: args
                    .memory
                    .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
                ..Default::default()
            };
            let resp = client.resize_vm(req).await?.into_owned();
            printer.vm_state(&resp, &args.vm_id, &resp.state)
        }
    }
}

/// Waits as `--wait` asks (with `default` when no state is named); the VM's info
/// when it reached a state, `None` when it is gone or nobody asked to wait.
async fn wait(
    client: &Client,
    vm_id: &str,
    args: &WaitArgs,
    default: WaitState,
) -> Result<Option<Box<pb::GetVmInfoResponse>>, CtlError> {
    let Some(target) = args.wait else {
        return Ok(None);
    };
    match wait_for(client, vm_id, target.unwrap_or(default), args.timeout).await? {
        Reached::State(info) => Ok(Some(info)),
        Reached::Deleted => Ok(None),
    }
}

/// `info`; with `--wait`, the info the wait saw when the VM reached the state.
async fn info(client: &Client, printer: Printer, vm: &VmArgs) -> Result<(), CtlError> {
    let nothing_to_show = || {
        CtlError::Usage(
            "info --wait deleted has nothing to show: use `delete --wait`, or wait for a state"
                .to_owned(),
        )
    };
    let info = match vm.wait.wait.map(|t| t.unwrap_or(WaitState::Running)) {
        Some(WaitState::Deleted) => return Err(nothing_to_show()),
        Some(target) => match wait_for(client, &vm.vm_id, target, vm.wait.timeout).await? {
            Reached::State(info) => *info,
            Reached::Deleted => return Err(nothing_to_show()),
        },
        None => {
            let req = pb::GetVmInfoRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            };
            client.get_vm_info(req).await?.into_owned()
        }
    };
    printer.info(&info)
}

/// `list`: one page, or with `--all` every page as one list.
async fn list(client: &Client, args: &ListArgs) -> Result<pb::ListVmsResponse, CtlError> {
    let mut request = pb::ListVmsRequest {
        state_filter: args.states.iter().map(|s| list_state(*s).into()).collect(),
        page_size: args.page_size.map_or(0, i32::from),
        page_token: args.page_token.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut all = client.list_vms(request.clone()).await?.into_owned();
    while args.all && !all.next_page_token.is_empty() {
        if all.next_page_token == request.page_token {
            return Err(CtlError::Rpc(ConnectError::internal(
                "the server returned the same page token twice",
            )));
        }
        request.page_token = std::mem::take(&mut all.next_page_token);
        let page = client.list_vms(request.clone()).await?.into_owned();
        all.vms.extend(page.vms);
        all.next_page_token = page.next_page_token;
        all.total_count = page.total_count;
    }
    Ok(all)
}

pub(crate) fn list_state(state: ListState) -> pb::VmState {
    match state {
        ListState::Created => pb::VmState::VM_STATE_CREATED,
        ListState::Running => pb::VmState::VM_STATE_RUNNING,
        ListState::Paused => pb::VmState::VM_STATE_PAUSED,
        ListState::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        ListState::Failed => pb::VmState::VM_STATE_FAILED,
    }
}
