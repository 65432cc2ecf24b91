use singleflight::config::Settings;
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
    actix_web::rt::spawn(stop_on_signals(app.handle()));
    match app.run_until_stopped().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("singleflight: server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C) stops the server gracefully: it stops accepting and finishes the
/// requests in flight (up to its shutdown timeout). A second signal stops it at once.
async fn stop_on_signals(server: actix_web::dev::ServerHandle) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot listen for SIGTERM/SIGINT; stop the service with SIGKILL");
        return;
    };
    let mut graceful = true;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if graceful {
            log::info!("{name}: finishing the requests in flight, then stopping");
        } else {
            log::warn!("{name} again: stopping now");
        }
        // Not awaited: the server's own future reports when it has stopped.
        drop(server.stop(graceful));
        graceful = false;
    }
}
