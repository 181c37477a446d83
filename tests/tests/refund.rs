//! Money back without a human, through the whole app and a fake Stripe that refunds as Stripe
//! does (idempotency keys, `charge_already_refunded`, `amount_too_large`, stored failures): an
//! order the app cannot fulfil after payment is refunded once, for what was paid, and the
//! customer told; a lost answer, replicas and redelivered events change nothing; a refund
//! made in the dashboard is never made again; with `auto_refund` off an operator's Refund does
//! the same, once; Stripe refusing leaves the issue open with its words; a refund failing later
//! reopens it; a dispute stops the order and raises the alert instead.

use std::time::Duration;

use astria_tests::db::TestDb;
use astria_tests::quiet::{quiesce, quiesce_with, Quiet};
use astria_tests::stripe as ps;
use astria_tests::whatsapp as wa;
use astria_tests::world::{Options, World};
use astria_tests::{on_both, TestApp};
use serde_json::{json, Value};

const ANA: &str = "4915112345678";
const REFUND_TEXT: &str =
    "text:Your refund of 19.99 USD is on its way back to you. Your bank may take 5 to 10 days to show it.";

/// Ana orders, sends two photos and pays; answers the order and the payment.
async fn order_and_pay(w: &World) -> (String, String) {
    for (i, m) in wa::order_steps(ANA, "r").into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        w.graph.wait_for(i + 1).await;
    }
    let sends = w.graph.wait_for(7).await;
    let order_id = ps::pay_link(&w.app, &w.stripe, &sends[6]).await;
    let session = w.stripe.session_for(&order_id).unwrap();
    (order_id, ps::payment_intent_of(session["id"].as_str().unwrap()))
}

/// Makes every outstanding event due and runs the relay, as the every-minute job would.
async fn relay_now(app: &TestApp) {
    TestDb::of(app).await.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
    wa::relay(app).await;
}

/// Waits (relaying) until Stripe has made `n` refunds; answers them.
async fn refunds_made(w: &World, n: usize) -> Vec<Value> {
    w.wait_until(&format!("{n} refund(s) made at Stripe, relaying"), Duration::from_secs(60), || async {
        let made = w.stripe.refunds();
        if made.len() >= n {
            return Some(made);
        }
        relay_now(&w.app).await;
        None
    })
    .await
}

/// The app has nothing left to do, with its backoffs skipped.
async fn settle(w: &World) {
    quiesce_with(&w.app, Quiet { fast_forward: true, ..Default::default() }).await;
}

fn summaries(sends: &[Value]) -> Vec<String> {
    sends.iter().map(wa::summary).collect()
}

/// One refund of the whole payment, asked for as the issue says (key, reason, metadata).
fn assert_one_full_refund(w: &World, order_id: &str, pi: &str) {
    let made = w.stripe.refunds();
    assert_eq!(made.len(), 1, "one refund: {made:#?}");
    let r = &made[0];
    assert_eq!((r["payment_intent"].as_str(), r["amount"].as_i64()), (Some(pi), Some(1999)), "{r}");
    assert_eq!(
        (r["reason"].as_str(), r["metadata"]["order_id"].as_str()),
        (Some("requested_by_customer"), Some(order_id))
    );
    let keys: Vec<Option<String>> = w.stripe.refund_requests().into_iter().map(|q| q.idempotency_key).collect();
    let key = format!("astria-refund-{order_id}-{pi}");
    assert!(keys.iter().all(|k| k.as_deref() == Some(key.as_str())), "every request with the order's key: {keys:?}");
}

async fn an_order_astria_refuses_is_refunded_once_and_the_customer_told(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    refunds_made(&w, 1).await;
    settle(&w).await;
    assert_one_full_refund(&w, &order_id, &pi);
    let sends = summaries(&w.graph.requests().await);
    assert_eq!(sends.iter().filter(|s| s.as_str() == REFUND_TEXT).count(), 1, "told once: {sends:#?}");
    assert_eq!(sends.last().map(String::as_str), Some(REFUND_TEXT), "{sends:#?}");
    let db = w.db().await;
    assert_eq!(db.order_status(&order_id).await, "failed");
    let issue = db
        .rows("SELECT resolved_at, resolution FROM payment_issues WHERE order_id = $1", &[order_id.as_str().into()])
        .await;
    assert_eq!(issue.len(), 1);
    assert!(issue[0][1].opt_text().is_some_and(|r| r.starts_with("refunded by the app (re_")), "{issue:?}");
    let row = db.rows("SELECT status, stripe_refund_id, customer_told FROM refunds", &[]).await;
    assert_eq!((row[0][0].text(), row[0][2].int()), ("succeeded".to_string(), 1));
    let metrics = metrics(&w.app).await;
    assert!(metrics.contains("astria_refunds{status=\"succeeded\"} 1"), "{metrics}");
    assert!(metrics.contains("astria_payment_issues_open 0"), "{metrics}");
}

on_both!(an_order_astria_refuses_is_refunded_once_and_the_customer_told);

async fn metrics(app: &TestApp) -> String {
    app.metrics(wa::ADMIN_TOKEN).await.1
}

/// Stripe makes the refund, but its answer comes after the app's timeout: the retry asks with
/// the same key and parameters, and gets the refund made, not a second one.
#[tokio::test]
async fn a_refund_whose_answer_was_lost_is_asked_again_and_made_once_postgres() {
    let w = World::start(Options::on(true).var("stripe_timeout_ms", "500")).await;
    w.stripe.delay_next_refunds(vec![Duration::from_millis(1500)]);
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    // The relay as its CronJob runs it (no backoff skipped): the retry comes after the
    // event's backoff, when Stripe has long finished the first request.
    w.wait_until("the refund booked after a retry", Duration::from_secs(60), || async {
        let db = w.db().await;
        if db.count("SELECT COUNT(*) FROM refunds WHERE status = 'succeeded'").await == 1 {
            return Some(());
        }
        wa::relay(&w.app).await;
        None
    })
    .await;
    settle(&w).await;
    assert!(w.stripe.refund_requests().len() >= 2, "asked again: {:?}", w.stripe.refund_requests());
    assert_one_full_refund(&w, &order_id, &pi);
    let sends = summaries(&w.graph.requests().await);
    assert_eq!(sends.iter().filter(|s| s.as_str() == REFUND_TEXT).count(), 1, "{sends:#?}");
}

/// Two workers of each kind, and the refund's event published again and again: one refund,
/// one message.
async fn with_two_replicas_and_redelivered_events_a_payment_is_refunded_once(postgres: bool) {
    let w = World::start(Options::on(postgres).replicas(2)).await;
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    refunds_made(&w, 1).await;
    // Redeliver the refund's event (as the relay would after a lost completion), three times.
    let db = w.db().await;
    for _ in 0..3 {
        db.execute(
            "UPDATE outbox SET status = 'pending', next_attempt_at = 0 WHERE event_type = 'payment.refund'",
            &[],
        )
        .await;
        wa::relay(&w.app).await;
    }
    settle(&w).await;
    assert_one_full_refund(&w, &order_id, &pi);
    let sends = summaries(&w.graph.requests().await);
    assert_eq!(sends.iter().filter(|s| s.as_str() == REFUND_TEXT).count(), 1, "{sends:#?}");
}

on_both!(with_two_replicas_and_redelivered_events_a_payment_is_refunded_once);

/// With `auto_refund` off an order that fails is only flagged; the operator refunds it in
/// Stripe's dashboard: recorded from Stripe's webhook, the issue resolved, and the console's
/// Refund then gives nothing back a second time.
async fn a_refund_made_in_the_dashboard_is_recorded_and_never_made_again(postgres: bool) {
    let w = World::start(Options::on(postgres).var("auto_refund", "false")).await;
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    let db = w.db().await;
    w.wait_until("the order failed and flagged", Duration::from_secs(30), || async {
        (db.count("SELECT COUNT(*) FROM payment_issues").await == 1).then_some(())
    })
    .await;
    settle(&w).await;
    assert!(w.stripe.refunds().is_empty(), "auto_refund off: flagged only");
    let (_, charge) = w.stripe.refund_in_dashboard(&pi);
    let (status, answer) = ps::post_event(&w.app, &ps::event("evt_dash", "charge.refunded", charge.clone())).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("refund_recorded")), "{answer}");
    // Signed, but contradicting what Stripe said before (its refund named with another
    // payment): acknowledged, so that Stripe stops redelivering it, and nothing booked.
    let mut other = charge.clone();
    other["payment_intent"] = json!("pi_someone_else");
    let (status, answer) = ps::post_event(&w.app, &ps::event("evt_dash_other", "charge.refunded", other)).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("refund_conflict")), "{answer}");
    assert_eq!(db.count("SELECT COUNT(*) FROM refunds").await, 1, "one refund booked: {}", w.app.log());
    let issue = db.text("SELECT event_id FROM payment_issues WHERE order_id = $1", &[order_id.as_str().into()]).await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL").await,
        0,
        "resolved by Stripe's word"
    );
    let (status, answer) =
        w.app.call("POST", &format!("/maintenance/payment-issues/{issue}/refund"), Some(wa::ADMIN_TOKEN), None).await;
    assert_eq!((status, answer["refund"].as_str()), (202, Some("succeeded")), "{answer}");
    settle(&w).await;
    assert_eq!(w.stripe.refunds().len(), 1, "only the dashboard's");
    assert!(w.stripe.refund_requests().is_empty(), "the app never asked Stripe");
}

on_both!(a_refund_made_in_the_dashboard_is_recorded_and_never_made_again);

/// `auto_refund` off: flagged only; the console's Refund (its id URL-encoded, as the console
/// sends it) gives the money back once, however often it is pressed.
async fn with_auto_refund_off_the_consoles_refund_gives_the_money_back_once(postgres: bool) {
    let w = World::start(Options::on(postgres).var("auto_refund", "false")).await;
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    let db = w.db().await;
    w.wait_until("the order flagged", Duration::from_secs(30), || async {
        (db.count("SELECT COUNT(*) FROM payment_issues").await == 1).then_some(())
    })
    .await;
    settle(&w).await;
    assert!(w.stripe.refunds().is_empty());
    let issue = db.text("SELECT event_id FROM payment_issues", &[]).await;
    let path = format!("/maintenance/payment-issues/{}/refund", issue.replace(':', "%3A"));
    assert_eq!(w.app.call("POST", &path, None, None).await.0, 401, "the admin token only");
    for _ in 0..3 {
        let (status, answer) = w.app.call("POST", &path, Some(wa::ADMIN_TOKEN), None).await;
        assert_eq!(status, 202, "{answer}");
    }
    refunds_made(&w, 1).await;
    settle(&w).await;
    assert_one_full_refund(&w, &order_id, &pi);
    let sends = summaries(&w.graph.requests().await);
    assert_eq!(sends.iter().filter(|s| s.as_str() == REFUND_TEXT).count(), 1, "{sends:#?}");
    assert_eq!(db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL").await, 0);
}

on_both!(with_auto_refund_off_the_consoles_refund_gives_the_money_back_once);

/// Stripe refuses the refund (402): the issue stays open with Stripe's words, the metrics say
/// so; a refund failing later at Stripe reopens a resolved issue.
#[tokio::test]
async fn a_refused_or_later_failed_refund_leaves_its_issue_open_for_a_human_postgres() {
    let w = World::start(Options::on(true)).await;
    w.stripe.fail_next_refunds(vec![402]);
    w.astria.fail_next(vec![422]);
    let (order_id, pi) = order_and_pay(&w).await;
    let db = w.db().await;
    w.wait_until("the refund booked refused", Duration::from_secs(60), || async {
        if db.count("SELECT COUNT(*) FROM refunds WHERE status = 'refused'").await == 1 {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
    settle(&w).await;
    let (_, issues) = w.app.call("GET", "/maintenance/payment-issues", Some(wa::ADMIN_TOKEN), None).await;
    let issue = &issues["payment_issues"][0];
    assert_eq!(issue["refund"]["status"], "refused", "{issues}");
    assert!(issue["refund"]["last_error"].as_str().is_some_and(|e| e.contains("Stripe answered 402")), "{issues}");
    assert!(metrics(&w.app).await.contains("astria_refunds{status=\"refused\"} 1"));
    let sends = summaries(&w.graph.requests().await);
    assert!(!sends.iter().any(|s| s == REFUND_TEXT), "nothing promised that did not happen: {sends:#?}");

    // The operator fixes the cause and presses Refund: given back, the issue resolved.
    let event_id = issue["event_id"].as_str().unwrap().to_string();
    let path = format!("/maintenance/payment-issues/{event_id}/refund");
    assert_eq!(w.app.call("POST", &path, Some(wa::ADMIN_TOKEN), None).await.0, 202);
    refunds_made(&w, 1).await;
    settle(&w).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL").await, 0);
    // Then the bank fails it (an expired card): Stripe says so, the issue opens again.
    let re = w.stripe.refunds()[0]["id"].as_str().unwrap().to_string();
    let failed = json!({"id": re, "object": "refund", "status": "failed", "payment_intent": pi, "amount": 1999,
                        "currency": "usd", "failure_reason": "expired_or_canceled_card", "metadata": {"order_id": order_id}});
    let (status, answer) = ps::post_event(&w.app, &ps::event("evt_refund_failed", "refund.failed", failed)).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("refund_failed")), "{answer}");
    let open = db.rows("SELECT detail FROM payment_issues WHERE resolved_at IS NULL", &[]).await;
    assert_eq!(open.len(), 1, "reopened");
    assert!(open[0][0].text().contains("failed at Stripe"), "{open:?}");
    let again = ps::post_event(
        &w.app,
        &ps::event(
            "evt_refund_failed_2",
            "refund.updated",
            json!({"id": re, "status": "failed", "payment_intent": pi}),
        ),
    )
    .await;
    assert_eq!(again.1["result"].as_str(), Some("unchanged"), "a repeated report changes nothing");
}

/// A chargeback on a delivered order: flagged for an operator, the alert's metric set, and
/// nothing refunded on top (the bank settles it).
async fn a_dispute_is_flagged_and_alerted_and_never_refunded_on_top(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (order_id, pi) = order_and_pay(&w).await;
    w.graph.wait_for(9).await;
    w.astria.finish(&w.app, &order_id).await;
    quiesce(&w.app).await;
    let db = w.db().await;
    assert_eq!(db.order_status(&order_id).await, "delivered");
    let dispute = json!({"id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": pi, "amount": 1999,
                         "currency": "usd", "reason": "fraudulent", "status": "needs_response"});
    let (status, answer) = ps::post_event(&w.app, &ps::event("evt_dispute", "charge.dispute.created", dispute)).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("dispute")), "{answer}");
    let issues = db.rows("SELECT kind, order_id FROM payment_issues", &[]).await;
    assert_eq!((issues[0][0].text(), issues[0][1].opt_text()), ("dispute".to_string(), Some(order_id.clone())));
    assert!(metrics(&w.app).await.contains("astria_disputes_open 1"));
    settle(&w).await;
    assert!(w.stripe.refund_requests().is_empty(), "a disputed payment is not refunded");
    let (status, _) =
        w.app.call("POST", "/maintenance/payment-issues/evt_dispute/refund", Some(wa::ADMIN_TOKEN), None).await;
    assert_eq!(status, 400, "not by the console either");
}

on_both!(a_dispute_is_flagged_and_alerted_and_never_refunded_on_top);

/// A dispute while the order is still training: the order stops, no portrait goes out.
#[tokio::test]
async fn a_dispute_while_training_stops_the_order_sqlite() {
    let w = World::start(Options::on(false)).await;
    let (order_id, pi) = order_and_pay(&w).await;
    w.graph.wait_for(9).await;
    let dispute =
        json!({"id": "dp_2", "payment_intent": pi, "amount": 1999, "currency": "usd", "reason": "fraudulent"});
    assert_eq!(ps::post_event(&w.app, &ps::event("evt_dispute_2", "charge.dispute.created", dispute)).await.0, 200);
    w.astria.finish(&w.app, &order_id).await;
    settle(&w).await;
    let db = w.db().await;
    assert_eq!(db.order_status(&order_id).await, "failed");
    let sends = summaries(&w.graph.requests().await);
    assert!(!sends.iter().any(|s| s.starts_with("image:")), "no portrait for a disputed payment: {sends:#?}");
}

/// Money for an order that could no longer take it (its link had expired, and the customer
/// paid the old session): refunded by itself, the customer told.
#[tokio::test]
async fn a_payment_for_an_order_that_could_not_take_it_is_refunded_sqlite() {
    let w = World::start(Options::on(false)).await;
    for (i, m) in wa::order_steps(ANA, "x").into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        w.graph.wait_for(i + 1).await;
    }
    w.graph.wait_for(7).await;
    let session = w.stripe.session_for_any().unwrap();
    let (session_id, order_id) =
        (session["id"].as_str().unwrap().to_string(), session["client_reference_id"].as_str().unwrap().to_string());
    let expired = ps::session(&session_id, &order_id, 1999, "usd", "unpaid");
    assert_eq!(
        ps::post_event(&w.app, &ps::event("evt_exp", "checkout.session.expired", expired)).await.1["result"],
        "expired"
    );
    let paid = ps::session(&session_id, &order_id, 1999, "usd", "paid");
    assert_eq!(
        ps::post_event(&w.app, &ps::event("evt_late", "checkout.session.completed", paid)).await.1["result"],
        "needs_refund"
    );
    refunds_made(&w, 1).await;
    settle(&w).await;
    assert_one_full_refund(&w, &order_id, &ps::payment_intent_of(&session_id));
    let sends = summaries(&w.graph.requests().await);
    assert_eq!(sends.iter().filter(|s| s.as_str() == REFUND_TEXT).count(), 1, "{sends:#?}");
}
