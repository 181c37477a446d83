//! The conversation state machine: every state × every kind of inbound message (table), named
//! scenarios, and property tests over random message sequences.

use astria_domain::conversation::{limits, step, Action, Config, Context, Inbound, Message, OrderView, Outcome, State};
use astria_domain::order::{check_payment, transition, PaymentCheck};
use astria_domain::texts::Texts;
use astria_domain::Money;
use astria_models::{OrderStatus, Pack, Photo};

fn pack(id: &str, title: &str, classes: &[&str], cents: i64) -> Pack {
    Pack {
        id: id.into(),
        title: title.into(),
        description: format!("{title} portraits"),
        astria_pack_id: 100,
        subject_classes: classes.iter().map(|c| c.to_string()).collect(),
        price: astria_models::Money { amount_minor: cents, currency: "usd".into() },
    }
}

fn packs() -> Vec<Pack> {
    vec![
        pack("corporate", "Corporate", &["man", "woman"], 1999),
        pack("pets", "Pets", &["dog"], 999),
        pack("family", "Family", &["man", "woman", "boy", "girl"], 2999),
    ]
}

fn config() -> Config {
    Config { min_photos: 2, max_photos: 3, texts: Texts::default() }
}

fn photo(hash: &str, mime: &str) -> Photo {
    Photo { media_id: format!("media-{hash}"), mime_type: mime.into(), sha256: hash.repeat(32) }
}

fn order(status: OrderStatus, photos: usize) -> OrderView {
    OrderView {
        id: "o1".into(),
        pack_id: "corporate".into(),
        status,
        photo_hashes: ["aa", "cc", "dd"].iter().take(photos).map(|h| h.repeat(32)).collect(),
        price: Money::new(1999, "usd").unwrap(),
        checkout_url: (status == OrderStatus::AwaitingPayment).then(|| "https://checkout.stripe.com/c/pay/cs_1".into()),
    }
}

/// A short, readable summary: `<state>:<action codes>`.
fn summary(out: &Outcome) -> String {
    let state = match &out.state {
        State::Idle => "idle",
        State::ChoosingPack => "pack",
        State::ChoosingSubject { .. } => "subject",
        State::Order { .. } => "order",
    };
    let codes: String = out
        .actions
        .iter()
        .map(|a| match a {
            Action::Send(Message::Text { .. }) => "T".to_string(),
            Action::Send(Message::Buttons { .. }) => "B".to_string(),
            Action::Send(Message::List { .. }) => "L".to_string(),
            // The conversation never sends these itself (other services do).
            Action::Send(Message::Image { .. } | Message::Document { .. } | Message::Template { .. }) => {
                "X".to_string()
            }
            Action::SetOptOut(true) => "O+".to_string(),
            Action::SetOptOut(false) => "O-".to_string(),
            Action::CreateOrder { .. } => "C".to_string(),
            Action::AddPhoto { .. } => "P".to_string(),
            Action::SetStatus { to, .. } => format!("S({})", format!("{to:?}").trim_start_matches("OrderStatus::")),
            Action::OrderAwaitingPayment { .. } => "A".to_string(),
            Action::ReopenOrder { .. } => "R".to_string(),
            Action::ExpireCheckout { .. } => "E".to_string(),
        })
        .collect();
    format!("{state}:{codes}")
}

const COLUMNS: [&str; 14] = [
    "hi",
    "image_new",
    "image_dup",
    "image_gif",
    "reply_pack",
    "reply_subject",
    "done",
    "sticker",
    "help",
    "status",
    "cancel",
    "menu",
    "stop",
    "start",
];

fn inbound(name: &str) -> Inbound {
    match name {
        "hi" => Inbound::Text("hi".into()),
        "image_new" => Inbound::Image(photo("bb", "image/jpeg")),
        "image_dup" => Inbound::Image(photo("aa", "image/jpeg")),
        "image_gif" => Inbound::Image(photo("ee", "image/gif")),
        "reply_pack" => Inbound::Reply { id: "pack:corporate".into(), title: "Corporate".into() },
        "reply_subject" => Inbound::Reply { id: "subject:woman".into(), title: "Woman".into() },
        "sticker" => Inbound::Other("sticker".into()),
        command => Inbound::Text(command.to_uppercase()),
    }
}

/// Runs one row of the table: `expected[i]` is the summary for `COLUMNS[i]`.
fn row(state: State, order: Option<OrderView>, expected: [&str; 14]) {
    let packs = packs();
    let config = config();
    let ctx = Context { packs: &packs, config: &config, opted_out: false, order: order.as_ref(), new_order_id: "o2" };
    for (col, want) in COLUMNS.iter().zip(expected) {
        let out = step(&ctx, &state, &inbound(col));
        assert_eq!(
            summary(&out),
            want,
            "state {state:?} / order {:?} / inbound {col}",
            order.as_ref().map(|o| o.status)
        );
    }
}

fn in_order() -> State {
    State::Order { order_id: "o1".into() }
}

#[rustfmt::skip]
#[test]
fn table_idle() {
    row(State::Idle, None, [
        "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L",
        "idle:T", "idle:T", "idle:T", "pack:L", "idle:O+T", "idle:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_choosing_pack() {
    row(State::ChoosingPack, None, [
        "pack:L", "pack:L", "pack:L", "pack:L", "subject:B", "pack:L", "pack:L", "pack:L",
        "pack:T", "pack:T", "idle:T", "pack:L", "pack:O+T", "pack:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_choosing_subject() {
    row(State::ChoosingSubject { pack_id: "corporate".into() }, None, [
        "subject:TB", "subject:TB", "subject:TB", "subject:TB", "subject:TB", "order:CT", "subject:TB", "subject:TB",
        "subject:T", "subject:T", "idle:T", "pack:L", "subject:O+T", "subject:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_collecting_photos() {
    row(in_order(), Some(order(OrderStatus::CollectingPhotos, 1)), [
        "order:T", "order:PB", "order:T", "order:T", "order:T", "order:T", "order:T", "order:T",
        "order:T", "order:T", "idle:S(Cancelled)T", "pack:S(Cancelled)L", "order:O+T", "order:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_awaiting_payment() {
    // Cancelling (CANCEL, MENU) an order that awaits payment also expires its Checkout session.
    row(in_order(), Some(order(OrderStatus::AwaitingPayment, 2)), [
        "order:T", "order:T", "order:T", "order:T", "order:T", "order:T", "order:T", "order:T",
        "order:T", "order:T", "idle:S(Cancelled)ET", "pack:S(Cancelled)EL", "order:O+T", "order:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_paid_training_delivering() {
    for status in [OrderStatus::Paid, OrderStatus::Training, OrderStatus::Delivering] {
        row(in_order(), Some(order(status, 2)), [
            "order:T", "order:T", "order:T", "order:T", "order:T", "order:T", "order:T", "order:T",
            "order:T", "order:T", "order:T", "order:T", "order:O+T", "order:T",
        ]);
    }
}

#[rustfmt::skip]
#[test]
fn table_delivered() {
    row(in_order(), Some(order(OrderStatus::Delivered, 2)), [
        "idle:T", "idle:T", "idle:T", "idle:T", "idle:T", "idle:T", "idle:T", "idle:T",
        "order:T", "order:T", "order:T", "pack:L", "order:O+T", "order:T",
    ]);
}

#[rustfmt::skip]
#[test]
fn table_cancelled_expired_failed() {
    for status in [OrderStatus::Cancelled, OrderStatus::Expired, OrderStatus::Failed] {
        row(in_order(), Some(order(status, 2)), [
            "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L", "pack:L",
            "order:T", "order:T", "order:T", "pack:L", "order:O+T", "order:T",
        ]);
    }
}

#[test]
fn an_opted_out_contact_gets_nothing_until_start() {
    let packs = packs();
    let config = config();
    let o = order(OrderStatus::CollectingPhotos, 1);
    for (state, order) in [(State::Idle, None), (State::ChoosingPack, None), (in_order(), Some(&o))] {
        let ctx = Context { packs: &packs, config: &config, opted_out: true, order, new_order_id: "o2" };
        for col in COLUMNS {
            let out = step(&ctx, &state, &inbound(col));
            assert_eq!(out.state, state, "{col}");
            if col == "start" {
                assert_eq!(out.actions.first(), Some(&Action::SetOptOut(false)), "{col}");
                assert_eq!(out.actions.len(), 2);
            } else {
                assert!(out.actions.is_empty(), "{state:?} {col}: {:?}", out.actions);
            }
        }
    }
}

// ------------------------------------------------------------------ scenarios

fn ctx_with<'a>(packs: &'a [Pack], config: &'a Config, order: Option<&'a OrderView>) -> Context<'a> {
    Context { packs, config, opted_out: false, order, new_order_id: "o2" }
}

#[test]
fn a_single_class_pack_creates_the_order_directly_and_packs_can_be_picked_by_number() {
    let (packs, config) = (packs(), config());
    let out = step(&ctx_with(&packs, &config, None), &State::ChoosingPack, &Inbound::Text(" 2 ".into()));
    assert_eq!(out.state, State::Order { order_id: "o2".into() });
    assert!(matches!(&out.actions[0], Action::CreateOrder { pack_id, subject_class, price, .. }
        if pack_id == "pets" && subject_class == "dog" && price == &Money::new(999, "usd").unwrap()));
}

#[test]
fn more_than_three_subject_classes_are_offered_as_a_list() {
    let (packs, config) = (packs(), config());
    let out = step(
        &ctx_with(&packs, &config, None),
        &State::ChoosingPack,
        &Inbound::Reply { id: "pack:family".into(), title: "Family".into() },
    );
    assert!(matches!(&out.actions[0], Action::Send(Message::List { rows, .. }) if rows.len() == 4));
}

#[test]
fn done_with_enough_photos_asks_for_payment_once() {
    let (packs, config) = (packs(), config());
    let o = order(OrderStatus::CollectingPhotos, 2);
    let out = step(
        &ctx_with(&packs, &config, Some(&o)),
        &in_order(),
        &Inbound::Reply { id: "done".into(), title: "Done".into() },
    );
    assert_eq!(summary(&out), "order:S(AwaitingPayment)AT");
    let Action::Send(Message::Text { body }) = &out.actions[2] else { panic!("{:?}", out.actions) };
    assert!(body.contains("19.99 USD"), "{body}");
}

#[test]
fn a_photo_beyond_the_maximum_is_refused_with_the_done_button() {
    let (packs, config) = (packs(), config());
    let o = order(OrderStatus::CollectingPhotos, 3);
    let out = step(&ctx_with(&packs, &config, Some(&o)), &in_order(), &Inbound::Image(photo("ff", "image/png")));
    assert_eq!(summary(&out), "order:B");
}

#[test]
fn pay_after_an_expired_link_reopens_the_order_under_a_new_id() {
    let (packs, config) = (packs(), config());
    let o = order(OrderStatus::Expired, 2);
    let out = step(&ctx_with(&packs, &config, Some(&o)), &in_order(), &Inbound::Text(" PAY ".into()));
    assert_eq!(summary(&out), "order:RAT");
    assert_eq!(out.state, State::Order { order_id: "o2".into() });
    assert_eq!(out.actions[0], Action::ReopenOrder { from_order_id: "o1".into(), order_id: "o2".into() });
    assert_eq!(out.actions[1], Action::OrderAwaitingPayment { order_id: "o2".into() });
    // STATUS on the expired order says how to get a new link.
    let status = step(&ctx_with(&packs, &config, Some(&o)), &in_order(), &Inbound::Text("status".into()));
    assert_eq!(
        status.actions,
        vec![Action::Send(Message::text(
            "Your payment link has expired. Reply PAY for a new one, or MENU to start over."
        ))]
    );
    // With a live link PAY resends it; with nothing to pay it is an ordinary message.
    let live = order(OrderStatus::AwaitingPayment, 2);
    let out = step(&ctx_with(&packs, &config, Some(&live)), &in_order(), &Inbound::Text("pay".into()));
    assert_eq!(summary(&out), "order:T");
    let out = step(&ctx_with(&packs, &config, None), &State::Idle, &Inbound::Text("pay".into()));
    assert_eq!(summary(&out), "pack:L");
    // An expired order whose photos the cleanup removed cannot be reopened: start over.
    let stripped = order(OrderStatus::Expired, 0);
    let out = step(&ctx_with(&packs, &config, Some(&stripped)), &in_order(), &Inbound::Text("pay".into()));
    assert_eq!(summary(&out), "pack:L");
}

#[test]
fn the_payment_link_is_resent_on_request() {
    let (packs, config) = (packs(), config());
    let o = order(OrderStatus::AwaitingPayment, 2);
    let out = step(&ctx_with(&packs, &config, Some(&o)), &in_order(), &Inbound::Text("link please".into()));
    assert_eq!(
        out.actions,
        vec![Action::Send(Message::Text { body: "Pay securely here: https://checkout.stripe.com/c/pay/cs_1".into() })]
    );
}

#[test]
fn long_titles_are_cut_to_whatsapp_limits() {
    let long = pack("long", &"Very long pack title ".repeat(5), &["man", "woman"], 100);
    let packs = vec![long];
    let config = config();
    let out = step(&ctx_with(&packs, &config, None), &State::Idle, &Inbound::Text("hi".into()));
    let Action::Send(Message::List { rows, .. }) = &out.actions[0] else { panic!("{:?}", out.actions) };
    assert_eq!(rows[0].title.chars().count(), limits::ROW_TITLE);
    assert!(rows[0].title.ends_with('…'));
}

// ------------------------------------------------------------------ properties

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The world the caller keeps: contact, orders (with how often each was paid), state.
    #[derive(Debug, Default)]
    struct World {
        opted_out: bool,
        state: State,
        orders: Vec<(OrderView, usize)>,
        next_id: usize,
    }

    #[derive(Debug, Clone)]
    enum Event {
        Message(Inbound),
        /// Stripe reports a payment (possibly again) for the newest order.
        Payment,
    }

    fn arb_inbound() -> impl Strategy<Value = Inbound> {
        prop_oneof![
            prop::sample::select(vec![
                "hi", "help", "status", "cancel", "menu", "restart", "stop", "start", "done", "2", "man", "woman",
                "dog", "💥", ""
            ])
            .prop_map(|t| Inbound::Text(t.to_string())),
            (0u8..6, prop::sample::select(vec!["image/jpeg", "image/png", "image/webp"]))
                .prop_map(|(h, m)| Inbound::Image(photo(&format!("{h:02x}"), m))),
            prop::sample::select(vec![
                "pack:corporate",
                "pack:pets",
                "pack:family",
                "pack:nope",
                "subject:woman",
                "subject:girl",
                "done"
            ])
            .prop_map(|id| Inbound::Reply { id: id.to_string(), title: id.to_string() }),
            prop::sample::select(vec!["sticker", "audio", "location", "unsupported"])
                .prop_map(|k| Inbound::Other(k.to_string())),
        ]
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![9 => arb_inbound().prop_map(Event::Message), 1 => Just(Event::Payment)]
    }

    fn within_limits(m: &Message) -> bool {
        match m {
            Message::Text { body } => body.chars().count() <= limits::TEXT_BODY,
            Message::Buttons { body, buttons } => {
                body.chars().count() <= limits::BODY
                    && !buttons.is_empty()
                    && buttons.len() <= limits::BUTTONS
                    && buttons.iter().all(|b| b.title.chars().count() <= limits::BUTTON_TITLE)
            }
            Message::List { body, rows, button, .. } => {
                body.chars().count() <= limits::BODY
                    && !rows.is_empty()
                    && rows.len() <= limits::LIST_ROWS
                    && button.chars().count() <= limits::LIST_BUTTON
                    && rows.iter().all(|r| r.title.chars().count() <= limits::ROW_TITLE)
            }
            // Not produced by the conversation.
            Message::Image { .. } | Message::Document { .. } | Message::Template { .. } => false,
        }
    }

    fn apply(w: &mut World, config: &Config, out: &Outcome) -> Result<(), TestCaseError> {
        for a in &out.actions {
            match a {
                Action::Send(m) => prop_assert!(within_limits(m), "outside WhatsApp limits: {m:?}"),
                Action::SetOptOut(v) => w.opted_out = *v,
                Action::CreateOrder { order_id, pack_id, price, .. } => {
                    w.next_id += 1;
                    let view = OrderView {
                        id: order_id.clone(),
                        pack_id: pack_id.clone(),
                        status: OrderStatus::CollectingPhotos,
                        photo_hashes: vec![],
                        price: price.clone(),
                        checkout_url: None,
                    };
                    w.orders.push((view, 0));
                }
                Action::AddPhoto { order_id, photo } => {
                    let (o, _) = w.orders.iter_mut().find(|(o, _)| &o.id == order_id).expect("known order");
                    prop_assert_eq!(o.status, OrderStatus::CollectingPhotos);
                    prop_assert!(!o.photo_hashes.contains(&photo.sha256), "duplicate photo stored");
                    o.photo_hashes.push(photo.sha256.clone());
                    prop_assert!(o.photo_hashes.len() <= config.max_photos);
                }
                Action::SetStatus { order_id, from, to } => {
                    let (o, _) = w.orders.iter_mut().find(|(o, _)| &o.id == order_id).expect("known order");
                    prop_assert_eq!(*from, o.status, "status change from a stale status");
                    // transition() refuses anything backwards or out of a final status.
                    o.status = transition(*from, *to).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if *to == OrderStatus::AwaitingPayment {
                        prop_assert!(o.photo_hashes.len() >= config.min_photos);
                    }
                }
                Action::OrderAwaitingPayment { .. } => {}
                Action::ExpireCheckout { order_id } => {
                    let (o, _) = w.orders.iter().find(|(o, _)| &o.id == order_id).expect("known order");
                    prop_assert_eq!(o.status, OrderStatus::Cancelled, "only a cancelled order's session is expired");
                }
                Action::ReopenOrder { from_order_id, order_id } => {
                    let (from, _) = w.orders.iter().find(|(o, _)| &o.id == from_order_id).expect("known order");
                    prop_assert_eq!(from.status, OrderStatus::Expired, "only an expired order is reopened");
                    let view = OrderView { id: order_id.clone(), status: OrderStatus::AwaitingPayment, ..from.clone() };
                    w.next_id += 1;
                    w.orders.push((view, 0));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        #[test]
        fn random_conversations_keep_every_invariant(events in prop::collection::vec(arb_event(), 1..60)) {
            let (packs, config) = (packs(), config());
            let mut w = World::default();
            for event in events {
                match event {
                    Event::Payment => {
                        if let Some((o, paid)) = w.orders.last_mut() {
                            if check_payment(o.status, &o.price, &o.price) == PaymentCheck::Settles {
                                o.status = transition(o.status, OrderStatus::Paid).unwrap();
                                *paid += 1;
                            }
                        }
                    }
                    Event::Message(inbound) => {
                        let new_id = format!("o{}", w.next_id);
                        let order = match &w.state {
                            State::Order { order_id } => w.orders.iter().map(|(o, _)| o).find(|o| &o.id == order_id).cloned(),
                            _ => None,
                        };
                        let ctx = Context { packs: &packs, config: &config, opted_out: w.opted_out, order: order.as_ref(), new_order_id: &new_id };
                        let out = step(&ctx, &w.state, &inbound);
                        if w.opted_out {
                            // Nothing but START's confirmation reaches an opted-out contact.
                            let sends = out.actions.iter().filter(|a| matches!(a, Action::Send(_))).count();
                            let resumes = out.actions.contains(&Action::SetOptOut(false));
                            prop_assert!(sends == 0 || resumes, "message to an opted-out contact: {:?}", out.actions);
                        }
                        apply(&mut w, &config, &out)?;
                        w.state = out.state;
                    }
                }
                // One open order per contact at every step: a new order only once the last
                // one is settled one way or another.
                let open = w
                    .orders
                    .iter()
                    .filter(|(o, _)| matches!(o.status, OrderStatus::CollectingPhotos | OrderStatus::AwaitingPayment))
                    .count();
                prop_assert!(open <= 1, "{open} open orders");
            }
            for (o, paid) in &w.orders {
                prop_assert!(*paid <= 1, "order {} paid {} times", o.id, paid);
            }
        }
    }
}
