//! Who a customer is, through the whole app: a phone number, a business-scoped user id (BSUID)
//! for a customer with a WhatsApp username who shares no number (2026), or both. Every kind
//! of webhook Meta sends a business number is answered 2xx in both identity shapes (the
//! corpus in `tests/fixtures/whatsapp-webhooks`); a username customer buys a pack and every
//! message reaches their BSUID; a person seen by phone, then by BSUID, then by both is one
//! contact with one order; a number change mid-order moves the portraits to the new
//! identity; WhatsApp's 131062 (no BSUID recipient for this message) falls back to the phone
//! or fails the message with its reason.

use std::path::PathBuf;

use astria_tests::astria as fa;
use astria_tests::db::TestDb;
use astria_tests::quiet::quiesce;
use astria_tests::stripe as ps;
use astria_tests::whatsapp::{self as wa, Answer};
use astria_tests::world::{Options, World};
use astria_tests::{on_both, workspace_root};
use serde_json::{json, Value};

/// The customer of the corpus and of the journeys: a phone number and a BSUID.
const PHONE: &str = "16505551234";
const BSUID: &str = "US.13491208655302741918";
const USERNAME: &str = "ana.photos";
/// Messages a customer has received once their order is training (as in image.rs).
const BEFORE_IMAGES: usize = 9;
const IMAGES: usize = fa::PROMPTS as usize * fa::IMAGES_PER_PROMPT;

async fn world_with(postgres: bool, vars: &[(&str, &str)]) -> World {
    World::start(vars.iter().fold(Options::on(postgres), |o, (k, v)| o.var(k, v))).await
}

async fn world(postgres: bool) -> World {
    world_with(postgres, &[]).await
}

/// How a customer's webhooks name them.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `wa_id`/`from` only, as before 2026 (and contacts stored by earlier releases).
    Phone,
    /// Phone and BSUID, as every webhook carries since April 2026.
    Both,
    /// BSUID and username only: a customer who adopted a username.
    Username,
}

/// A webhook of `messages` from the customer, in `shape`. The message builders take the phone
/// as `from`; the username shape replaces it.
fn from_customer(shape: Shape, messages: Vec<Value>) -> Value {
    let body = wa::inbound(PHONE, messages);
    match shape {
        Shape::Phone => body,
        Shape::Both => wa::with_bsuid(&body, BSUID),
        Shape::Username => wa::as_username(&body, BSUID, USERNAME),
    }
}

async fn say(w: &World, shape: Shape, message: Value) {
    let (status, body) = wa::post_webhook(&w.app, &from_customer(shape, vec![message])).await;
    assert_eq!(status, 200, "{body}\n{}", w.app.log());
}

/// Pays the order whose payment link is the send at `link_index`; answers the order id.
async fn pay_link(w: &World, link_index: usize) -> String {
    let sends = w.graph.wait_for(link_index + 1).await;
    ps::pay_link(&w.app, &w.stripe, &sends[link_index]).await
}

/// The customer orders in `shape` (hi, pack, subject, two photos, Done) and pays.
async fn order_and_pay(w: &World, shape: Shape, prefix: &str) -> String {
    for (i, m) in wa::order_steps(PHONE, prefix).into_iter().enumerate() {
        say(w, shape, m).await;
        w.graph.wait_for(i + 1).await;
    }
    pay_link(w, 6).await
}

fn recipients(sends: &[Value]) -> Vec<(Option<String>, Option<String>)> {
    sends.iter().map(|s| (s["to"].as_str().map(str::to_string), s["recipient"].as_str().map(str::to_string))).collect()
}

// ------------------------------------------------------------------ the corpus

fn corpus_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/whatsapp-webhooks")
}

/// Every corpus file (name, body with our number), the number change last: it moves the
/// customer to a new number and BSUID.
fn corpus() -> Vec<(String, Value)> {
    let mut files: Vec<(String, Value)> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap().replace("PHONE_NUMBER_ID", wa::PHONE_NUMBER_ID);
            (p.file_stem().unwrap().to_string_lossy().into_owned(), serde_json::from_str(&text).unwrap())
        })
        .collect();
    files.sort_by_key(|(name, _)| (name == "system-user-changed-number", name.clone()));
    assert!(files.len() >= 45, "the corpus is in {}", corpus_dir().display());
    files
}

/// `body` as a customer with a username sends it: no phone anywhere it names the person.
fn bsuid_only(body: &Value) -> Value {
    let mut body = body.clone();
    for change in body["entry"].as_array_mut().unwrap().iter_mut().flat_map(|e| e["changes"].as_array_mut().unwrap()) {
        let value = &mut change["value"];
        for (list, field) in
            [("contacts", "wa_id"), ("messages", "from"), ("statuses", "recipient_id"), ("user_preferences", "wa_id")]
        {
            // get_mut: indexing would add the list as null where there is none.
            for item in value.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
                if list == "statuses" && item["recipient_type"] == "group" {
                    continue; // a group's status names the group
                }
                item.as_object_mut().unwrap().remove(field);
            }
        }
    }
    body
}

/// Gives every message id of `body` the suffix `tag`, so that one file can be delivered in
/// two shapes as two messages, and dates its messages and statuses now, as a live webhook is
/// (the corpus's dates are months old: the 24-hour window would be long closed).
fn retag(body: &Value, tag: &str) -> Value {
    let mut body = body.clone();
    for change in body["entry"].as_array_mut().unwrap().iter_mut().flat_map(|e| e["changes"].as_array_mut().unwrap()) {
        let value = &mut change["value"];
        for m in value.get_mut("messages").and_then(Value::as_array_mut).into_iter().flatten() {
            let id = m["id"].as_str().unwrap().to_string();
            m["id"] = json!(format!("{id}.{tag}"));
            m["timestamp"] = json!(wa::unix_now().to_string());
        }
        for s in value.get_mut("statuses").and_then(Value::as_array_mut).into_iter().flatten() {
            s["timestamp"] = json!(wa::unix_now().to_string());
        }
    }
    body
}

async fn outbound(db: &TestDb) -> i64 {
    db.count("SELECT COUNT(*) FROM outbound_messages").await
}

/// Kinds that change nothing and ask for no answer.
fn silent(name: &str) -> bool {
    ["reaction", "edit", "revoke", "status-", "field-", "system-"].iter().any(|p| name.starts_with(p))
}

async fn every_kind_of_webhook_meta_sends_is_answered_2xx_in_both_identity_shapes(postgres: bool) {
    let w = world(postgres).await;
    // The relay's first call migrates the schema, so that the counts below can be read at once.
    wa::relay(&w.app).await;
    let db = TestDb::of(&w.app).await;
    let files = corpus();
    let mut deliveries = vec![];
    for (tag, shape) in [("both", false), ("bsuid", true)] {
        for (name, body) in &files {
            if name == "system-user-changed-number" {
                continue; // at the very end, below
            }
            let body = retag(body, tag);
            deliveries.push((format!("{name} ({tag})"), if shape { bsuid_only(&body) } else { body }));
        }
    }
    let change = files.iter().find(|(n, _)| n == "system-user-changed-number").unwrap();
    deliveries.push(("system-user-changed-number".into(), retag(&change.1, "change")));

    for (name, body) in &deliveries {
        let before = outbound(&db).await;
        let (status, answer) = wa::post_webhook(&w.app, body).await;
        assert!((200..300).contains(&status), "{name}: HTTP {status} {answer}\n{}", w.app.log());
        wa::worked_through(&w.app).await;
        if silent(name) {
            assert_eq!(outbound(&db).await, before, "{name} changes nothing and is not answered");
        }
    }
    quiesce(&w.app).await;
    let sent = outbound(&db).await;
    assert!(sent > 0, "the messages that ask for an answer got one");

    // Meta redelivers: every one answered 2xx again, as a duplicate, and nothing is doubled.
    for (name, body) in &deliveries {
        let (status, answer) = wa::post_webhook(&w.app, body).await;
        assert!((200..300).contains(&status), "{name} redelivered: HTTP {status} {answer}");
    }
    quiesce(&w.app).await;
    assert_eq!(outbound(&db).await, sent, "redeliveries queue nothing");

    // One person throughout, now known by the number and BSUID the change announced, with
    // their marketing opt-out recorded.
    let contacts = db.rows("SELECT phone, bsuid, marketing_opt_out FROM contacts", &[]).await;
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0][0].opt_text().as_deref(), Some("16505559876"));
    assert_eq!(contacts[0][1].opt_text().as_deref(), Some("US.48120937561029384756"));
    assert_eq!(contacts[0][2].int(), 1);
    for svc in ["message", "image", "payment", "maintenance"] {
        assert_eq!(w.app.get(&format!("/health/{svc}")).await.status(), 200, "{svc}");
    }
    let log = w.app.log();
    for personal in [PHONE, BSUID, USERNAME, "16505559876", "US.48120937561029384756"] {
        assert!(!log.contains(personal), "an identifier of the customer in the log: {personal}");
    }
}

on_both!(every_kind_of_webhook_meta_sends_is_answered_2xx_in_both_identity_shapes);

/// A voice note, a sticker or a Flow answer while the bot waits for photos: "please send photos".
#[tokio::test]
async fn kinds_the_bot_cannot_use_are_answered_with_what_it_waits_for() {
    let w = world(false).await;
    for (i, m) in wa::order_steps(PHONE, "k").into_iter().take(3).enumerate() {
        say(&w, Shape::Username, m).await;
        w.graph.wait_for(i + 1).await;
    }
    let files = corpus();
    for (n, name) in ["voice", "sticker-animated", "interactive-nfm-reply"].iter().enumerate() {
        let body = &files.iter().find(|(f, _)| f == name).unwrap().1;
        let (status, answer) = wa::post_webhook(&w.app, &bsuid_only(&retag(body, "k"))).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let sends = w.graph.wait_for(4 + n).await;
        let reply = wa::summary(&sends[3 + n]);
        assert!(reply.to_lowercase().contains("photo"), "{name} answered: {reply}");
    }
}

// ------------------------------------------------------------------ journeys

async fn a_customer_with_a_username_buys_a_pack_and_every_message_goes_to_their_bsuid(postgres: bool) {
    let w = world(postgres).await;
    // WhatsApp reports each send as it does for a BSUID: recipient_user_id, no recipient_id.
    w.graph.report_statuses(&w.app);
    let order_id = order_and_pay(&w, Shape::Username, "u").await;
    let sends = w.graph.wait_for(BEFORE_IMAGES).await;
    assert!(wa::summary(&sends[8]).starts_with("text:Your AI model is training"), "{}", wa::summary(&sends[8]));
    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + IMAGES + 1;
    w.graph.wait_for(total).await;
    quiesce(&w.app).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total, "{:#?}", sends.iter().map(wa::summary).collect::<Vec<_>>());
    assert_eq!(sends.iter().filter(|s| s["type"] == "image").count(), IMAGES);
    assert!(
        recipients(&sends).iter().all(|r| *r == (None, Some(BSUID.to_string()))),
        "every message to the BSUID as `recipient`, none with `to`: {:?}",
        recipients(&sends)
    );
    let db = TestDb::of(&w.app).await;
    assert_eq!(db.order_status(&order_id).await, "delivered");
    // The status webhooks (naming only the BSUID) were matched to the messages.
    let delivered = "SELECT COUNT(*) FROM outbound_messages WHERE delivery_status = 'delivered'";
    w.wait_until("every send booked delivered by its status webhook", std::time::Duration::from_secs(30), || async {
        (db.count(delivered).await == total as i64).then_some(())
    })
    .await;
    let log = w.app.log();
    for personal in [BSUID, USERNAME, PHONE] {
        assert!(!log.contains(personal), "the customer's identifier {personal} in the log");
    }
}

on_both!(a_customer_with_a_username_buys_a_pack_and_every_message_goes_to_their_bsuid);

async fn a_customer_seen_by_phone_then_by_bsuid_only_then_by_both_is_one_contact_with_one_order(postgres: bool) {
    let w = world(postgres).await;
    let steps = wa::order_steps(PHONE, "m");
    // By phone alone (as an earlier release stored them): hi, pack, subject, a first photo.
    for (i, m) in steps[..4].iter().enumerate() {
        say(&w, Shape::Phone, m.clone()).await;
        w.graph.wait_for(i + 1).await;
    }
    // By BSUID alone: nothing yet says it is the same person; the bot greets a newcomer.
    say(&w, Shape::Username, wa::text(PHONE, "m-hello", "hello")).await;
    let sends = w.graph.wait_for(5).await;
    assert_eq!(recipients(&sends[4..]), [(None, Some(BSUID.to_string()))]);
    // By both: one person. The order goes on where the phone left it: the second photo, Done.
    say(&w, Shape::Both, steps[4].clone()).await;
    w.graph.wait_for(6).await;
    say(&w, Shape::Both, steps[5].clone()).await;
    let order_id = pay_link(&w, 7).await;
    quiesce(&w.app).await;

    let db = TestDb::of(&w.app).await;
    let contacts = db.rows("SELECT wa_id, phone, bsuid FROM contacts", &[]).await;
    assert_eq!(contacts.len(), 1, "one contact: {contacts:?}");
    assert_eq!((contacts[0][1].opt_text(), contacts[0][2].opt_text()), (Some(PHONE.into()), Some(BSUID.into())));
    let orders = db.rows("SELECT id, wa_id FROM orders", &[]).await;
    assert_eq!(orders.len(), 1, "one order: {orders:?}");
    assert_eq!((orders[0][0].text(), orders[0][1].text()), (order_id.clone(), contacts[0][0].text()));
    assert_eq!(db.count("SELECT COUNT(*) FROM order_photos").await, 2, "both photos on the order");
    // Once the phone is known, messages go to it (Meta's advice).
    let sends = w.graph.requests().await;
    assert_eq!(recipients(&sends[5..]).last().unwrap(), &(Some(PHONE.to_string()), None));
}

on_both!(a_customer_seen_by_phone_then_by_bsuid_only_then_by_both_is_one_contact_with_one_order);

async fn a_number_change_in_the_middle_of_an_order_sends_the_portraits_to_the_new_identity(postgres: bool) {
    let w = world(postgres).await;
    let order_id = order_and_pay(&w, Shape::Both, "n").await;
    w.graph.wait_for(BEFORE_IMAGES).await;
    // WhatsApp announces the new number (and with it a new BSUID) from the old identity.
    let change = corpus().into_iter().find(|(n, _)| n == "system-user-changed-number").unwrap().1;
    let (status, _) = wa::post_webhook(&w.app, &retag(&change, "n")).await;
    assert_eq!(status, 200);
    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + IMAGES + 1;
    w.graph.wait_for(total).await;
    quiesce(&w.app).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total);
    assert!(recipients(&sends[..BEFORE_IMAGES]).iter().all(|r| r.0.as_deref() == Some(PHONE)));
    assert!(
        recipients(&sends[BEFORE_IMAGES..]).iter().all(|r| r.0.as_deref() == Some("16505559876")),
        "every portrait to the new number: {:?}",
        recipients(&sends[BEFORE_IMAGES..])
    );
    let db = TestDb::of(&w.app).await;
    assert_eq!(db.order_status(&order_id).await, "delivered");
    assert_eq!(db.count("SELECT COUNT(*) FROM contacts").await, 1, "the identifiers moved, not the orders");
}

on_both!(a_number_change_in_the_middle_of_an_order_sends_the_portraits_to_the_new_identity);

/// WhatsApp refuses a BSUID as the recipient of some messages (131062). Without a phone
/// number the message fails with that reason, on the console's list and in the metrics.
#[tokio::test]
async fn a_bsuid_refused_by_whatsapp_without_a_known_phone_fails_the_message_with_the_reason() {
    let w = world(false).await;
    w.graph.rule(|send| match send.get("recipient") {
        Some(_) => Answer::Error(400, 131062),
        None => Answer::Ok,
    });
    say(&w, Shape::Username, wa::text(PHONE, "r1", "hi")).await;
    w.graph.wait_for(1).await;
    quiesce(&w.app).await;
    let (status, failed) = w.app.call("GET", "/maintenance/messages?status=failed", Some(wa::ADMIN_TOKEN), None).await;
    assert_eq!(status, 200);
    let failed = failed["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let reason = failed[0].to_string();
    assert!(reason.contains("131062") && reason.contains("no phone number"), "{reason}");
    let (_, text) = w.app.metrics(wa::ADMIN_TOKEN).await;
    assert!(text.contains("astria_outbound_messages{status=\"failed\"} 1"), "{text}");
}

/// The phone number becomes known while the send to the BSUID is in flight, and WhatsApp
/// refuses the BSUID (131062): the same message goes to the phone, once.
#[tokio::test]
async fn a_bsuid_refused_by_whatsapp_falls_back_to_the_phone_once_it_is_known() {
    // As SpinKube runs it: the conversation worker in a process of its own, so it steps the
    // second message while the sender waits on WhatsApp (in one process, Spin's Redis trigger
    // would take it only after the sender's call).
    let options =
        Options::on(false).var("whatsapp_timeout_ms", "30000").as_deployment(std::time::Duration::from_secs(1));
    let w = World::start(options).await;
    let gate = w.graph.hold_next(Answer::Error(400, 131062));
    say(&w, Shape::Username, wa::text(PHONE, "f1", "hi")).await;
    gate.wait_arrived().await;
    // Meanwhile the customer writes again, and this time WhatsApp names the phone too.
    say(&w, Shape::Both, wa::text(PHONE, "f2", "hi again")).await;
    wa::worked_through(&w.app).await;
    gate.open();
    let sends = w.graph.wait_for(3).await;
    quiesce(&w.app).await;
    let sends_after = w.graph.requests().await;
    assert_eq!(sends_after.len(), 3, "{:?}", recipients(&sends_after));
    assert_eq!(
        recipients(&sends),
        [(None, Some(BSUID.into())), (Some(PHONE.into()), None), (Some(PHONE.into()), None)]
    );
    // The first two are one message: refused to the BSUID, then sent to the phone.
    assert_eq!(sends[0]["biz_opaque_callback_data"], sends[1]["biz_opaque_callback_data"]);
    let db = TestDb::of(&w.app).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'sent'").await, 2);
    assert_eq!(db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'failed'").await, 0);
}
