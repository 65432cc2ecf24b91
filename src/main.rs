use singleflight::config::{Action, Invocation, Rejected};
use singleflight::shutdown::Shutdown;
use singleflight::startup::Application;
use tokio::signal::unix::{signal, SignalKind};

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    singleflight::memory::large_bodies_to_own_mappings();
    // Read before anything else is touched: `--help` and `--version` answer at once, and no
    // backend is reached with settings that are wrong.
    let Invocation {
        action,
        telemetry,
        settings,
    } = match Invocation::from_command_line() {
        Ok(invocation) => invocation,
        Err(Rejected::Clap(e)) => {
            // The help, the version, or what is wrong with the command line, with clap's exit
            // code (0, or 2 for a mistake).
            let _ = e.print();
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(Rejected::Config(e)) => {
            eprintln!("singleflight: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let telemetry = match singleflight::telemetry::init(&telemetry) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("singleflight: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if action == Some(Action::SeedDemo) {
        return match singleflight::demo::seed(&settings).await {
            Ok(()) => {
                log::info!("demo templates loaded (into an empty table only)");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("singleflight: seed-demo: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("singleflight: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    actix_web::rt::spawn(stop_on_signals(app.shutdown()));
    let served = app.run_until_stopped().await;
    // Every request is answered: the spans still queued go out before the process ends.
    telemetry.shutdown();
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("singleflight: server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C) stops the service without losing a request: it drains for
/// `SHUTDOWN_DRAIN_MS`, stops accepting, finishes the requests in flight and hands its leases
/// back (see `singleflight::shutdown`). A second signal stops it at once.
async fn stop_on_signals(shutdown: Shutdown) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot listen for SIGTERM/SIGINT; stop the service with SIGKILL");
        return;
    };
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if shutdown.begun() {
            log::warn!("{name} again: stopping now");
            shutdown.now().await;
        } else {
            log::info!("{name}: stopping without losing a request");
            let stopping = shutdown.clone();
            actix_web::rt::spawn(async move { stopping.begin().await });
        }
    }
}
