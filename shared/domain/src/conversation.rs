//! The conversation: a pure function of (state, inbound message, context) to (new state,
//! actions). The caller loads the context (contact, open order, catalogue, config), performs
//! the actions (send, store, emit) and saves the new state; nothing here does I/O.
//!
//! ```text
//! idle ─► choosing-pack ─► choosing-subject ─► order: collecting-photos ─DONE─► awaiting-payment
//!                 └────────(one class)────────┘            (paid, training, delivering: status)
//! ```
//! In every state: HELP, STATUS, CANCEL (before payment), MENU/RESTART, STOP/START; PAY after
//! a payment link expired or a payment failed (a new order with the same photos and a new link).

use astria_models::{OrderStatus, Pack, Photo};
use serde::{Deserialize, Serialize};

use crate::money::Money;
use crate::order::is_paid;
use crate::texts::{fill, Texts};

/// WhatsApp Cloud API limits for interactive messages.
pub mod limits {
    pub const BODY: usize = 1024;
    pub const TEXT_BODY: usize = 4096;
    pub const BUTTONS: usize = 3;
    pub const BUTTON_TITLE: usize = 20;
    pub const LIST_ROWS: usize = 10;
    pub const ROW_TITLE: usize = 24;
    pub const ROW_DESCRIPTION: usize = 72;
    pub const LIST_BUTTON: usize = 20;
    pub const SECTION_TITLE: usize = 24;
    pub const CAPTION: usize = 1024;
}

/// Where a contact is in the conversation; saved per contact between messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    #[default]
    Idle,
    ChoosingPack,
    ChoosingSubject {
        pack_id: String,
    },
    /// An order exists; what happens next depends on its status.
    Order {
        order_id: String,
    },
}

/// One inbound WhatsApp message, parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Text(String),
    Image(Photo),
    /// A tap on a reply button, a list row or a template quick-reply: its id and title.
    Reply {
        id: String,
        title: String,
    },
    /// Anything else the customer sent (audio, sticker, location, a Flow's answer, ...), by
    /// WhatsApp's type name: answered as the conversation's state says.
    Other(String),
    /// What changes nothing and asks for no answer: a reaction (or its removal), an edit or a
    /// deletion of an earlier message, a system notice.
    Ignored(String),
}

/// An outbound message, already within WhatsApp's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    Text {
        body: String,
    },
    Buttons {
        body: String,
        buttons: Vec<Choice>,
    },
    List {
        body: String,
        button: String,
        section: String,
        rows: Vec<Choice>,
    },
    /// An image by public URL (JPEG/PNG up to 5 MB), with an optional caption.
    Image {
        link: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
    /// A file by public URL (up to 100 MB): how an image too large for an image message goes.
    Document {
        link: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        caption: Option<String>,
    },
    /// The configured template (`whatsapp_template_name`), the only kind WhatsApp delivers
    /// outside the 24-hour window; `parameters` fill its body variables in order.
    Template {
        #[serde(default)]
        parameters: Vec<String>,
    },
}

impl Message {
    /// The stored name of the message's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Text { .. } => "text",
            Message::Buttons { .. } => "buttons",
            Message::List { .. } => "list",
            Message::Image { .. } => "image",
            Message::Document { .. } => "document",
            Message::Template { .. } => "template",
        }
    }

    /// The same image as a document, for when WhatsApp cannot take it as an image (over 5 MB).
    pub fn image_as_document(&self) -> Option<Message> {
        match self {
            Message::Image { link, caption } => {
                let name = link.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("portrait.jpg");
                Some(Message::Document {
                    link: link.clone(),
                    filename: Some(name.to_string()),
                    caption: caption.clone(),
                })
            }
            _ => None,
        }
    }

    /// Whether messages of this kind to one person are paced (WhatsApp's pair rate limit).
    pub fn is_paced(&self) -> bool {
        self.is_media()
    }

    /// An image or a document: the kinds a portrait goes as (so a text carries none).
    pub fn is_media(&self) -> bool {
        matches!(self, Message::Image { .. } | Message::Document { .. })
    }

    /// A plain text message, cut to WhatsApp's limit.
    pub fn text(body: impl AsRef<str>) -> Message {
        Message::Text { body: clip(body.as_ref(), limits::TEXT_BODY) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub id: String,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(Message),
    SetOptOut(bool),
    CreateOrder {
        order_id: String,
        pack_id: String,
        subject_class: String,
        price: Money,
    },
    AddPhoto {
        order_id: String,
        photo: Photo,
    },
    SetStatus {
        order_id: String,
        from: OrderStatus,
        to: OrderStatus,
    },
    /// The order is complete and needs a payment link (payment-service creates it).
    OrderAwaitingPayment {
        order_id: String,
    },
    /// An order that awaited payment ended (cancelled): its Checkout session, if one was made,
    /// must be expired so that the old link cannot take money for a cancelled order.
    ExpireCheckout {
        order_id: String,
    },
    /// A new order awaiting payment, copied from an expired one (same pack, subject, price and
    /// photos): a fresh Checkout session needs a fresh order, since an order's session is
    /// created once.
    ReopenOrder {
        from_order_id: String,
        order_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: State,
    pub actions: Vec<Action>,
}

/// The open order as the conversation needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub id: String,
    pub pack_id: String,
    pub status: OrderStatus,
    pub photo_hashes: Vec<String>,
    pub price: Money,
    pub checkout_url: Option<String>,
}

/// Photo count bounds and texts, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub min_photos: usize,
    pub max_photos: usize,
    pub texts: Texts,
}

/// Everything besides the state and the message that a step may read.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub packs: &'a [Pack],
    pub config: &'a Config,
    pub opted_out: bool,
    pub order: Option<&'a OrderView>,
    /// The id to use if this step creates an order (generated by the caller).
    pub new_order_id: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Help,
    Status,
    Cancel,
    Menu,
    Stop,
    Start,
    Done,
    Pay,
}

fn command(inbound: &Inbound) -> Option<Command> {
    let word = match inbound {
        Inbound::Text(t) => t.trim().to_lowercase(),
        Inbound::Reply { id, .. } => id.trim().to_lowercase(),
        _ => return None,
    };
    Some(match word.as_str() {
        "help" | "?" => Command::Help,
        "status" => Command::Status,
        "cancel" => Command::Cancel,
        "menu" | "restart" => Command::Menu,
        "stop" | "unsubscribe" => Command::Stop,
        "start" => Command::Start,
        "done" => Command::Done,
        "pay" => Command::Pay,
        _ => return None,
    })
}

/// Cuts to at most `max` characters (not bytes), marking the cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn text(body: String) -> Action {
    Action::Send(Message::Text { body: clip(&body, limits::TEXT_BODY) })
}

fn choices(body: &str, options: Vec<Choice>, list_button: &str, section: &str) -> Action {
    if options.len() <= limits::BUTTONS {
        let buttons = options.into_iter().map(|c| Choice {
            id: c.id,
            title: clip(&c.title, limits::BUTTON_TITLE),
            description: None,
        });
        Action::Send(Message::Buttons { body: clip(body, limits::BODY), buttons: buttons.collect() })
    } else {
        let rows = options.into_iter().take(limits::LIST_ROWS).map(|c| Choice {
            id: c.id,
            title: clip(&c.title, limits::ROW_TITLE),
            description: c.description.map(|d| clip(&d, limits::ROW_DESCRIPTION)),
        });
        Action::Send(Message::List {
            body: clip(body, limits::BODY),
            button: clip(list_button, limits::LIST_BUTTON),
            section: clip(section, limits::SECTION_TITLE),
            rows: rows.collect(),
        })
    }
}

impl<'a> Context<'a> {
    fn t(&self) -> &Texts {
        &self.config.texts
    }

    fn pack_list(&self, intro: &str) -> Action {
        let rows = self
            .packs
            .iter()
            .map(|p| Choice {
                id: format!("pack:{}", p.id),
                title: p.title.clone(),
                description: Some(format!(
                    "{} · {}",
                    Money::try_from(&p.price).map(|m| m.to_string()).unwrap_or_default(),
                    p.description
                )),
            })
            .collect::<Vec<_>>();
        // Always a list: pack rows carry prices and descriptions that buttons cannot.
        Action::Send(Message::List {
            body: clip(intro, limits::BODY),
            button: clip(&self.t().pack_list_button, limits::LIST_BUTTON),
            section: clip(&self.t().pack_list_section, limits::SECTION_TITLE),
            rows: rows
                .into_iter()
                .take(limits::LIST_ROWS)
                .map(|c| Choice {
                    id: c.id,
                    title: clip(&c.title, limits::ROW_TITLE),
                    description: c.description.map(|d| clip(&d, limits::ROW_DESCRIPTION)),
                })
                .collect(),
        })
    }

    fn find_pack(&self, inbound: &Inbound) -> Option<&'a Pack> {
        let key = match inbound {
            Inbound::Reply { id, .. } => id.strip_prefix("pack:").unwrap_or(id).to_string(),
            Inbound::Text(t) => t.trim().to_lowercase(),
            _ => return None,
        };
        // By id, by title, or by position in the list ("2").
        self.packs
            .iter()
            .find(|p| p.id.eq_ignore_ascii_case(&key) || p.title.eq_ignore_ascii_case(&key))
            .or_else(|| key.parse::<usize>().ok().filter(|n| *n >= 1).and_then(|n| self.packs.get(n - 1)))
    }

    fn subject_choices(&self, pack: &Pack) -> Action {
        let options = pack
            .subject_classes
            .iter()
            .map(|c| Choice { id: format!("subject:{c}"), title: capitalise(c), description: None })
            .collect();
        choices(&self.t().choose_subject, options, &self.t().pack_list_button, &self.t().pack_list_section)
    }

    fn greet(&self) -> Outcome {
        Outcome { state: State::ChoosingPack, actions: vec![self.pack_list(&self.t().greeting)] }
    }

    fn create_order(&self, pack: &Pack, subject: &str) -> Outcome {
        let price = match Money::try_from(&pack.price) {
            Ok(p) => p,
            // A misconfigured pack cannot be sold; say so rather than take a wrong amount.
            Err(_) => {
                return Outcome { state: State::ChoosingPack, actions: vec![text(self.t().unknown_pack.clone())] }
            }
        };
        let order_id = self.new_order_id.to_string();
        let min = self.config.min_photos.to_string();
        let max = self.config.max_photos.to_string();
        Outcome {
            state: State::Order { order_id: order_id.clone() },
            actions: vec![
                Action::CreateOrder { order_id, pack_id: pack.id.clone(), subject_class: subject.to_string(), price },
                text(fill(&self.t().send_photos, &[("pack", &pack.title), ("min", &min), ("max", &max)])),
            ],
        }
    }

    fn choose_pack(&self, pack: &Pack) -> Outcome {
        match pack.subject_classes.as_slice() {
            [only] => self.create_order(pack, only),
            _ => Outcome {
                state: State::ChoosingSubject { pack_id: pack.id.clone() },
                actions: vec![self.subject_choices(pack)],
            },
        }
    }

    fn status_text(&self, state: &State) -> String {
        let t = self.t();
        match (state, self.order) {
            (State::Order { .. }, Some(o)) => match o.status {
                OrderStatus::CollectingPhotos => fill(
                    &t.photo_received,
                    &[("count", &o.photo_hashes.len().to_string()), ("max", &self.config.max_photos.to_string())],
                ),
                OrderStatus::AwaitingPayment => match &o.checkout_url {
                    Some(url) => fill(&t.payment_link, &[("url", url)]),
                    None => t.payment_link_pending.clone(),
                },
                OrderStatus::Paid => t.in_progress.clone(),
                OrderStatus::Training => t.training.clone(),
                OrderStatus::Delivering => t.delivering.clone(),
                OrderStatus::Delivered => t.delivered_offer_more.clone(),
                OrderStatus::Failed | OrderStatus::DeliveryFailed => t.failed.clone(),
                OrderStatus::Cancelled => t.cancelled.clone(),
                OrderStatus::Expired => t.payment_expired.clone(),
            },
            _ => t.nothing_to_cancel.clone(),
        }
    }

    /// The open order, if the state refers to one and it is loaded.
    fn open_order(&self, state: &State) -> Option<&'a OrderView> {
        match state {
            State::Order { order_id } => self.order.filter(|o| &o.id == order_id),
            _ => None,
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// One step of the conversation.
pub fn step(ctx: &Context<'_>, state: &State, inbound: &Inbound) -> Outcome {
    let t = ctx.t();
    let cmd = command(inbound);
    let same = |actions: Vec<Action>| Outcome { state: state.clone(), actions };

    if let Inbound::Ignored(_) = inbound {
        return same(vec![]);
    }
    // An opted-out contact gets nothing until START.
    if ctx.opted_out {
        return match cmd {
            Some(Command::Start) => same(vec![Action::SetOptOut(false), text(t.restarted.clone())]),
            _ => same(vec![]),
        };
    }
    let order = ctx.open_order(state);
    match cmd {
        Some(Command::Stop) => return same(vec![Action::SetOptOut(true), text(t.stopped.clone())]),
        Some(Command::Start) => return same(vec![text(t.restarted.clone())]),
        Some(Command::Help) => return same(vec![text(t.help.clone())]),
        Some(Command::Status) => return same(vec![text(ctx.status_text(state))]),
        Some(Command::Cancel) => {
            return match (state, order) {
                (_, Some(o)) if is_paid(o.status) && o.status != OrderStatus::Delivered => {
                    same(vec![text(t.cannot_cancel_paid.clone())])
                }
                (_, Some(o)) if matches!(o.status, OrderStatus::CollectingPhotos | OrderStatus::AwaitingPayment) => {
                    let mut actions = cancel(o);
                    actions.push(text(t.cancelled.clone()));
                    Outcome { state: State::Idle, actions }
                }
                (State::ChoosingPack | State::ChoosingSubject { .. }, _) => {
                    Outcome { state: State::Idle, actions: vec![text(t.cancelled.clone())] }
                }
                _ => same(vec![text(t.nothing_to_cancel.clone())]),
            }
        }
        Some(Command::Menu) => {
            return match order {
                Some(o) if is_paid(o.status) && o.status != OrderStatus::Delivered => {
                    same(vec![text(t.in_progress.clone())])
                }
                Some(o) if matches!(o.status, OrderStatus::CollectingPhotos | OrderStatus::AwaitingPayment) => {
                    let mut out = ctx.greet();
                    out.actions.splice(0..0, cancel(o));
                    out
                }
                _ => ctx.greet(),
            }
        }
        Some(Command::Pay) => match order {
            // Photos of long-expired orders are removed by the cleanup: then start over.
            Some(o) if o.status == OrderStatus::Expired && o.photo_hashes.len() >= ctx.config.min_photos => {
                let order_id = ctx.new_order_id.to_string();
                return Outcome {
                    state: State::Order { order_id: order_id.clone() },
                    actions: vec![
                        Action::ReopenOrder { from_order_id: o.id.clone(), order_id: order_id.clone() },
                        Action::OrderAwaitingPayment { order_id },
                        text(fill(&t.preparing_payment, &[("price", &o.price.to_string())])),
                    ],
                };
            }
            Some(o) if o.status == OrderStatus::AwaitingPayment => return same(vec![text(ctx.status_text(state))]),
            // Nothing to pay: an ordinary message.
            _ => {}
        },
        Some(Command::Done) | None => {}
    }

    match state {
        State::Idle => ctx.greet(),
        State::ChoosingPack => match ctx.find_pack(inbound) {
            Some(pack) => ctx.choose_pack(pack),
            None => same(vec![ctx.pack_list(&t.unknown_pack)]),
        },
        State::ChoosingSubject { pack_id } => {
            let Some(pack) = ctx.packs.iter().find(|p| &p.id == pack_id) else {
                // The pack left the catalogue meanwhile: start over.
                return Outcome { state: State::ChoosingPack, actions: vec![ctx.pack_list(&t.unknown_pack)] };
            };
            let chosen = match inbound {
                Inbound::Reply { id, .. } => id.strip_prefix("subject:").map(str::to_string),
                Inbound::Text(s) => Some(s.trim().to_lowercase()),
                _ => None,
            };
            match chosen.filter(|c| pack.subject_classes.iter().any(|k| k == c)) {
                Some(subject) => ctx.create_order(pack, &subject),
                None => same(vec![text(t.unknown_subject.clone()), ctx.subject_choices(pack)]),
            }
        }
        State::Order { .. } => match order {
            None => ctx.greet(),
            Some(o) => match o.status {
                OrderStatus::CollectingPhotos => collect(ctx, state, o, inbound, cmd),
                OrderStatus::AwaitingPayment => same(vec![text(ctx.status_text(state))]),
                OrderStatus::Paid | OrderStatus::Training | OrderStatus::Delivering => {
                    same(vec![text(ctx.status_text(state))])
                }
                OrderStatus::Delivered => {
                    Outcome { state: State::Idle, actions: vec![text(t.delivered_offer_more.clone())] }
                }
                OrderStatus::Cancelled | OrderStatus::Expired | OrderStatus::Failed | OrderStatus::DeliveryFailed => {
                    ctx.greet()
                }
            },
        },
    }
}

fn collect(ctx: &Context<'_>, state: &State, o: &OrderView, inbound: &Inbound, cmd: Option<Command>) -> Outcome {
    let t = ctx.t();
    let (min, max) = (ctx.config.min_photos, ctx.config.max_photos);
    let same = |actions: Vec<Action>| Outcome { state: state.clone(), actions };
    let count = o.photo_hashes.len();
    if cmd == Some(Command::Done) {
        if count < min {
            return same(vec![text(fill(&t.need_more_photos, &[("missing", &(min - count).to_string())]))]);
        }
        return same(vec![
            Action::SetStatus { order_id: o.id.clone(), from: o.status, to: OrderStatus::AwaitingPayment },
            Action::OrderAwaitingPayment { order_id: o.id.clone() },
            text(fill(&t.preparing_payment, &[("price", &o.price.to_string())])),
        ]);
    }
    let Inbound::Image(photo) = inbound else {
        return same(vec![text(t.expecting_photo.clone())]);
    };
    if !matches!(photo.mime_type.as_str(), "image/jpeg" | "image/png") {
        return same(vec![text(t.unsupported_image.clone())]);
    }
    if o.photo_hashes.iter().any(|h| h.eq_ignore_ascii_case(&photo.sha256)) {
        return same(vec![text(t.duplicate_photo.clone())]);
    }
    if count >= max {
        return same(vec![done_prompt(ctx, fill(&t.too_many_photos, &[("max", &max.to_string())]))]);
    }
    let n = count + 1;
    let reply = if n >= min {
        done_prompt(ctx, fill(&t.photo_minimum_reached, &[("count", &n.to_string())]))
    } else {
        text(fill(&t.photo_received, &[("count", &n.to_string()), ("max", &max.to_string())]))
    };
    same(vec![Action::AddPhoto { order_id: o.id.clone(), photo: photo.clone() }, reply])
}

fn done_prompt(ctx: &Context<'_>, body: String) -> Action {
    let t = ctx.t();
    choices(&body, vec![Choice { id: "done".into(), title: t.done_button.clone(), description: None }], "", "")
}
/// Cancels an open order; one that awaited payment also has its Checkout session expired.
fn cancel(o: &OrderView) -> Vec<Action> {
    let mut actions = vec![Action::SetStatus { order_id: o.id.clone(), from: o.status, to: OrderStatus::Cancelled }];
    if o.status == OrderStatus::AwaitingPayment {
        actions.push(Action::ExpireCheckout { order_id: o.id.clone() });
    }
    actions
}
