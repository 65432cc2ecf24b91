use singleflight::config::Settings;
use singleflight::shutdown::Shutdown;
use singleflight::startup::Application;
use tokio::signal::unix::{signal, SignalKind};

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed_demo = match args.as_slice() {
        [] => false,
        [command] if command == "seed-demo" => true,
        _ => {
            eprintln!(
                "singleflight: unknown arguments {args:?}\n\
                 usage: singleflight             serve (settings come from the environment)\n\
                 \x20      singleflight seed-demo   prepare the schema (MIGRATE), load the demo \
                 templates into an empty table, and exit"
            );
            return std::process::ExitCode::from(2);
        }
    };
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("singleflight: configuration error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if seed_demo {
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
    match app.run_until_stopped().await {
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
