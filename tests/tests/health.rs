//! The application's own spin.toml in the host: every service answers its health route.

use astria_models::{HealthReport, HealthStatus};
use astria_tests::{app_manifest, spawn_app, AppConfig};

#[tokio::test]
async fn every_service_answers_its_health_route_with_name_and_version() {
    let app = spawn_app(AppConfig::new(app_manifest())).await.unwrap();
    for service in ["message", "image", "payment", "maintenance"] {
        let r = app.get(&format!("/health/{service}")).await;
        assert_eq!(r.status(), 200, "/health/{service}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let report: HealthReport = r.json().await.unwrap();
        assert_eq!(report.service, service);
        assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(report.status, HealthStatus::Ok);
    }
    assert_eq!(app.get("/.well-known/spin/health").await.status(), 200);
}

#[tokio::test]
async fn an_unknown_path_under_a_service_route_is_404() {
    let app = spawn_app(AppConfig::new(app_manifest())).await.unwrap();
    assert_eq!(app.get("/health/nobody").await.status(), 404);
}

#[tokio::test]
async fn sigterm_stops_the_host_cleanly() {
    let mut app = spawn_app(AppConfig::new(app_manifest())).await.unwrap();
    let status = app.stop().expect("the host stops by itself on SIGTERM");
    assert!(status.success(), "{status}");
}
