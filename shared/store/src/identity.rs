//! Who a contact is: the identifiers WhatsApp knows one person by, and the contact (row of
//! `contacts`, keyed by `wa_id`) they lead to.
//!
//! A person writes from a phone number (`wa_id`), from a business-scoped user id (BSUID) when
//! they adopted a WhatsApp username, or from both; a parent BSUID may come along. Orders,
//! messages and the conversation hang on the contact's key, which never changes; the
//! identifiers are columns that move when WhatsApp says they did (a new number), and two
//! contacts that turn out to be one person (seen first by phone alone, then by BSUID alone,
//! then by both) become one, with the orders of both.
//!
//! The key of a new contact is its phone number when it has one, else its BSUID (so contacts
//! from before usernames keep theirs), unless a contact already holds that key (the number
//! moved to someone else): then the caller's fresh id.
//!
//! Every function here runs inside the caller's transaction.

use crate::{Db, DbError, Dialect, Value};

/// The identifiers of one person as a webhook gives them; at least one is present.
#[derive(Clone, Copy, Default)]
pub struct Ids<'a> {
    pub phone: Option<&'a str>,
    pub bsuid: Option<&'a str>,
    pub parent_bsuid: Option<&'a str>,
}

/// Where to send a contact's messages: WhatsApp prefers the phone number when it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// `"to": <wa_id>`.
    Phone(String),
    /// `"recipient": <BSUID or parent BSUID>` (no phone number is known).
    User(String),
}

/// What [`identify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// The contact's key (`contacts.wa_id`).
    pub key: String,
    /// The contact was created by this message.
    pub new: bool,
    /// Contacts merged into this one (their orders and messages now hang on `key`).
    pub merged: Vec<String>,
}

fn one_key<D: Db + ?Sized>(db: &D, sql: &str, value: &str) -> Result<Option<String>, DbError> {
    let rows = db.query(&db.dialect().sql(sql), &[Value::from(value)])?;
    rows.first().map(|r| r.text(0)).transpose()
}

/// The contact holding `phone`: by the column, or a row a previous release wrote during a
/// rollout (keyed by its phone, the column not filled).
fn by_phone<D: Db + ?Sized>(db: &D, phone: &str) -> Result<Option<String>, DbError> {
    one_key(
        db,
        "SELECT wa_id FROM contacts WHERE phone = $1 OR (ids_known = 0 AND wa_id = $1)
         ORDER BY ids_known DESC",
        phone,
    )
}

fn by_bsuid<D: Db + ?Sized>(db: &D, bsuid: &str) -> Result<Option<String>, DbError> {
    one_key(db, "SELECT wa_id FROM contacts WHERE bsuid = $1", bsuid)
}

fn by_parent<D: Db + ?Sized>(db: &D, parent: &str) -> Result<Option<String>, DbError> {
    one_key(db, "SELECT wa_id FROM contacts WHERE parent_bsuid = $1 ORDER BY updated_at DESC", parent)
}

/// Serialises, until commit, every transaction that records one of `ids` (PostgreSQL; SQLite
/// lets one writer in at a time anyway). Without it, a person's first two messages, one naming
/// the phone and one only the BSUID, could both find no contact and both record the BSUID,
/// and one would fail on the unique index. Locks are taken in one order, so two transactions
/// cannot wait for each other.
fn lock<D: Db + ?Sized>(db: &D, ids: Ids<'_>) -> Result<(), DbError> {
    if db.dialect() != Dialect::Postgres {
        return Ok(());
    }
    let mut keys: Vec<i64> = [ids.phone, ids.bsuid, ids.parent_bsuid].into_iter().flatten().map(lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        db.execute("SELECT pg_advisory_xact_lock($1)", &[Value::Int(key)])?;
    }
    Ok(())
}

/// A stable 64-bit key for an identifier (FNV-1a), apart from the migrations' lock key by a
/// prefix.
fn lock_key(identifier: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"astria-contact:".iter().chain(identifier.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The contact `ids` name, without creating one: by BSUID, then phone, then parent BSUID.
pub fn find<D: Db + ?Sized>(db: &D, ids: Ids<'_>) -> Result<Option<String>, DbError> {
    if let Some(key) = ids.bsuid.map(|b| by_bsuid(db, b)).transpose()?.flatten() {
        return Ok(Some(key));
    }
    if let Some(key) = ids.phone.map(|p| by_phone(db, p)).transpose()?.flatten() {
        return Ok(Some(key));
    }
    ids.parent_bsuid.map(|p| by_parent(db, p)).transpose().map(Option::flatten)
}

/// A contact that a message's identifiers already lead to, with every one of them recorded
/// on it: what the conversation step needs of it, read in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The contact's key (`contacts.wa_id`).
    pub key: String,
    pub opted_out: bool,
    /// The conversation state's JSON.
    pub conversation: String,
    /// Messages of the contact wait for the 24-hour window to open again.
    pub awaiting_window: bool,
}

/// What [`recognise`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recognised {
    /// One contact holds every identifier given (and no other holds any): recording the
    /// message would change none of them.
    Known(Known),
    /// No contact holds any identifier given, and none is keyed by one: [`create`] records
    /// the person.
    New,
    /// Anything else (an identifier new to a known contact or held by another, a row of a
    /// previous release, only a parent BSUID given): [`identify`]'s work.
    Other,
}

/// The common cases of [`identify`] in one read: the contact `ids` name when recording the
/// message would change none of its identifiers, with what the step needs of it, its row locked
/// until commit (PostgreSQL) as [`identify`]'s upsert would lock it; or that the person is
/// new to the app.
///
/// What [`identify`] also refreshes for a known contact, the profile name and the 24-hour
/// window, is left to the step's final write of the conversation
/// (`repo::save_conversation_seen`).
pub fn recognise<D: Db + ?Sized>(db: &D, ids: Ids<'_>) -> Result<Recognised, DbError> {
    if ids.phone.is_none() && ids.bsuid.is_none() {
        return Ok(Recognised::Other);
    }
    let rows = db.query(&db.dialect().sql(&recognise_sql(db.dialect())), &recognise_params(ids))?;
    interpret(ids, &rows)
}

/// One delivery of an event from outside (`processed_webhooks`): only the first is worked
/// through.
#[derive(Clone, Copy)]
pub struct Delivery<'a> {
    /// Who sent it (`"whatsapp"`, `"stripe"`).
    pub source: &'a str,
    /// The sender's id of the event (a WhatsApp message id).
    pub external_id: &'a str,
    pub now_ms: i64,
}

/// [`crate::repo::first_delivery`] of `delivery` and, if it was the first, [`recognise`] of
/// `ids`: `None` for a redelivery.
///
/// On PostgreSQL one call of the function `astria_recognise_first` (migration 18): the dedupe's
/// insert as a CTE of the read, planned once per session. Spin's PostgreSQL host sends every
/// statement unnamed, so the server parses and plans it at each call, and the conversation
/// worker runs this for every message; a PL/pgSQL function keeps its statements' plans for the
/// session, and Spin's pool keeps sessions (`docs/performance.md`, "A step's dedupe with its
/// contact read"). A redelivery's read still locks the contact's row until commit, which
/// nothing else in the step would have done: harmless, as redeliveries are rare and the lock
/// is the one the step takes anyway. SQLite, in process, runs the two statements.
pub fn recognise_first<D: Db + ?Sized>(
    db: &D,
    delivery: Delivery<'_>,
    ids: Ids<'_>,
) -> Result<Option<Recognised>, DbError> {
    let dedupe = || crate::repo::first_delivery(db, delivery.source, delivery.external_id, delivery.now_ms);
    if db.dialect() == Dialect::Sqlite || (ids.phone.is_none() && ids.bsuid.is_none()) {
        return match dedupe()? {
            true => recognise(db, ids).map(Some),
            false => Ok(None),
        };
    }
    // The contact's columns as `recognise` reads them, then whether the delivery is new (one
    // row with NULL contact columns when no contact matches).
    let mut params = recognise_params(ids).to_vec();
    params.extend([Value::from(delivery.source), Value::from(delivery.external_id), Value::Int(delivery.now_ms)]);
    let rows = db.query("SELECT * FROM astria_recognise_first($1, $2, $3, $4, $5, $6, $7)", &params)?;
    let first = rows.first().ok_or_else(|| DbError::Decode("no row from the dedupe".into()))?;
    if first.int(8)? == 0 {
        return Ok(None);
    }
    let contacts: Vec<crate::Row> = rows.into_iter().filter(|r| matches!(r.0.first(), Some(Value::Text(_)))).collect();
    interpret(ids, &contacts).map(Some)
}

/// [`recognise`]'s read: every row an identifier leads to, as `find` and `identify` would
/// look: by phone (a previous release's row keyed by the phone included), BSUID, parent
/// BSUID, and the keys a new contact would take; on PostgreSQL locked until commit. The
/// function `astria_recognise_first` (migration 18) holds the same read: a change here is a
/// migration there.
pub(crate) fn recognise_sql(dialect: Dialect) -> String {
    let lock = match dialect {
        Dialect::Postgres => " FOR UPDATE OF contacts",
        Dialect::Sqlite => "",
    };
    format!(
        "SELECT wa_id, phone, bsuid, parent_bsuid, ids_known, opted_out, conversation,
            CASE WHEN EXISTS (SELECT 1 FROM outbound_messages m WHERE m.wa_id = contacts.wa_id AND m.status = $4)
                 THEN 1 ELSE 0 END AS awaiting_window
         FROM contacts WHERE phone = $1 OR bsuid = $2 OR parent_bsuid = $3 OR wa_id = $1 OR wa_id = $2{lock}"
    )
}

fn recognise_params(ids: Ids<'_>) -> [Value; 4] {
    [
        Value::from(ids.phone),
        Value::from(ids.bsuid),
        Value::from(ids.parent_bsuid),
        Value::from(crate::messages::status::AWAITING_WINDOW),
    ]
}

/// What [`recognise_sql`]'s rows say about `ids`.
fn interpret(ids: Ids<'_>, rows: &[crate::Row]) -> Result<Recognised, DbError> {
    if rows.is_empty() {
        return Ok(Recognised::New);
    }
    // The rows `find` would take the sender for (by BSUID or phone, the parent only when
    // neither leads anywhere); the others (a key alone, a parent BSUID alone) are not touched
    // by `identify` then.
    let given = |id: Option<&str>, recorded: &Option<String>| id.is_some() && id == recorded.as_deref();
    let mut naming = vec![];
    for r in rows {
        let (key, phone, bsuid, legacy) = (r.text(0)?, r.opt_text(1)?, r.opt_text(2)?, r.int(4)? == 0);
        let by_phone = given(ids.phone, &phone) || (legacy && ids.phone == Some(key.as_str()));
        if by_phone || given(ids.bsuid, &bsuid) {
            naming.push((r, key, phone, bsuid, legacy));
        }
    }
    let [(r, key, phone, bsuid, legacy)] = naming.as_slice() else { return Ok(Recognised::Other) };
    let holds = |id: Option<&str>, recorded: &Option<String>| id.is_none_or(|id| recorded.as_deref() == Some(id));
    if *legacy || !holds(ids.phone, phone) || !holds(ids.bsuid, bsuid) || !holds(ids.parent_bsuid, &r.opt_text(3)?) {
        return Ok(Recognised::Other);
    }
    Ok(Recognised::Known(Known {
        key: key.clone(),
        opted_out: r.int(5)? != 0,
        conversation: r.text(6)?,
        awaiting_window: r.int(7)? != 0,
    }))
}

/// Records a person [`recognise`] found [`Recognised::New`]: one contact with every identifier
/// given, keyed by the phone number, else the BSUID, in the idle state; answers it. A
/// concurrent first message that recorded one of the identifiers meanwhile makes this fail
/// with `DbError::Conflict` (the unique indexes), as in [`identify`].
pub fn create<D: Db + ?Sized>(
    db: &D,
    ids: Ids<'_>,
    profile_name: Option<&str>,
    sent_at_ms: i64,
    now_ms: i64,
) -> Result<Known, DbError> {
    let key = ids.phone.or(ids.bsuid).ok_or_else(|| DbError::Decode("a new contact with no identifier".into()))?;
    db.execute(
        &db.dialect().sql(
            "INSERT INTO contacts (wa_id, phone, bsuid, parent_bsuid, profile_name, opted_out, last_inbound_at,
                conversation, updated_at, first_seen_at, ids_known)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $8, 1)",
        ),
        &[
            Value::from(key),
            Value::from(ids.phone),
            Value::from(ids.bsuid),
            Value::from(ids.parent_bsuid),
            Value::from(profile_name),
            Value::Int(sent_at_ms),
            Value::from(IDLE),
            Value::Int(now_ms),
        ],
    )?;
    Ok(Known { key: key.to_string(), opted_out: false, conversation: IDLE.to_string(), awaiting_window: false })
}

/// The conversation of a new contact.
const IDLE: &str = r#"{"state":"idle"}"#;

/// Records an inbound message from the person `ids` names: finds their contact (by BSUID
/// first, then phone, then parent BSUID) or creates it, records every identifier the message
/// carries on it (taking them from, and merging, another contact that held them), and
/// refreshes the profile name and the 24-hour window (never back: Meta may deliver an older
/// message late). The contact's row stays locked until
/// commit (PostgreSQL), so two messages of one person are handled one after the other.
pub fn identify<D: Db + ?Sized>(
    db: &D,
    ids: Ids<'_>,
    profile_name: Option<&str>,
    sent_at_ms: i64,
    fresh_key: &str,
    now_ms: i64,
) -> Result<Identified, DbError> {
    lock(db, ids)?;
    let found = find(db, ids)?;
    let (key, new) = match found {
        Some(key) => (key, false),
        None => {
            let wanted = ids.phone.or(ids.bsuid).or(ids.parent_bsuid).unwrap_or(fresh_key);
            let taken = one_key(db, "SELECT wa_id FROM contacts WHERE wa_id = $1", wanted)?.is_some();
            (if taken { fresh_key.to_string() } else { wanted.to_string() }, true)
        }
    };
    // The upsert creates the contact, or refreshes it and takes its row lock.
    db.execute(
        &db.dialect().sql(
            "INSERT INTO contacts (wa_id, profile_name, opted_out, last_inbound_at, conversation, updated_at, first_seen_at, ids_known)
             VALUES ($1, $2, 0, $3, $4, $5, $5, 1)
             ON CONFLICT (wa_id) DO UPDATE SET
                profile_name = COALESCE(excluded.profile_name, contacts.profile_name),
                last_inbound_at = CASE WHEN excluded.last_inbound_at > COALESCE(contacts.last_inbound_at, 0)
                                       THEN excluded.last_inbound_at ELSE contacts.last_inbound_at END,
                updated_at = excluded.updated_at",
        ),
        &[
            Value::from(key.as_str()),
            Value::from(profile_name),
            Value::Int(sent_at_ms),
            Value::from(IDLE),
            Value::Int(now_ms),
        ],
    )?;
    let merged = attach(db, &key, ids, Merge::IfEmptied, now_ms)?;
    Ok(Identified { key, new, merged })
}

/// Whether a contact whose identifiers [`attach`] took is the same person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// One message named both: a contact left with no identifier was this person (seen before
    /// by only the identifier taken) and becomes part of `key`.
    IfEmptied,
    /// A number change: the new number may have been someone else's (numbers are recycled);
    /// they only lose it.
    Never,
}

/// Records `ids` on the contact `key`: each identifier another contact held is taken from it,
/// and, with [`Merge::IfEmptied`], a contact left with no identifier at all is merged into
/// `key`. Answers the keys of the contacts merged.
pub fn attach<D: Db + ?Sized>(
    db: &D,
    key: &str,
    ids: Ids<'_>,
    how: Merge,
    now_ms: i64,
) -> Result<Vec<String>, DbError> {
    lock(db, ids)?;
    let mut holders = vec![];
    for (column, value) in [("phone", ids.phone), ("bsuid", ids.bsuid)] {
        let Some(value) = value else { continue };
        let holder = match column {
            "phone" => by_phone(db, value)?,
            _ => by_bsuid(db, value)?,
        };
        if let Some(other) = holder.filter(|h| h != key) {
            db.execute(
                &db.dialect().sql(&format!(
                    "UPDATE contacts SET {column} = NULL, ids_known = 1, updated_at = $1 WHERE wa_id = $2"
                )),
                &[Value::Int(now_ms), Value::from(other.as_str())],
            )?;
            holders.push(other);
        }
        db.execute(
            &db.dialect().sql(&format!("UPDATE contacts SET {column} = $1, ids_known = 1 WHERE wa_id = $2")),
            &[Value::from(value), Value::from(key)],
        )?;
    }
    if let Some(parent) = ids.parent_bsuid {
        db.execute(
            &db.dialect().sql("UPDATE contacts SET parent_bsuid = $1 WHERE wa_id = $2"),
            &[Value::from(parent), Value::from(key)],
        )?;
    }
    let mut merged = vec![];
    if how == Merge::Never {
        return Ok(merged);
    }
    for other in holders {
        let left = db.query(
            &db.dialect().sql("SELECT phone, bsuid FROM contacts WHERE wa_id = $1"),
            &[Value::from(other.as_str())],
        )?;
        let empty = left.first().map(|r| Ok::<_, DbError>(r.opt_text(0)?.is_none() && r.opt_text(1)?.is_none()));
        if empty.transpose()?.unwrap_or(false) {
            merge(db, &other, key, now_ms)?;
            merged.push(other);
        }
    }
    Ok(merged)
}

/// Makes `from` part of `into`: its orders and messages move, its opt-out and window carry
/// over, and `from` is removed. The conversation of `into` is kept unless only `from` was in
/// the middle of an order (then the customer goes on with that order).
fn merge<D: Db + ?Sized>(db: &D, from: &str, into: &str, now_ms: i64) -> Result<(), DbError> {
    let d = db.dialect();
    let (from_v, into_v) = (Value::from(from), Value::from(into));
    for table in ["orders", "outbound_messages"] {
        db.execute(
            &d.sql(&format!("UPDATE {table} SET wa_id = $1 WHERE wa_id = $2")),
            &[into_v.clone(), from_v.clone()],
        )?;
    }
    db.execute(
        &d.sql(
            "UPDATE contacts SET
                opted_out = CASE WHEN f.opted_out = 1 THEN 1 ELSE contacts.opted_out END,
                marketing_opt_out = CASE WHEN f.marketing_opt_out = 1 THEN 1 ELSE contacts.marketing_opt_out END,
                last_inbound_at = CASE WHEN f.last_inbound_at > COALESCE(contacts.last_inbound_at, 0)
                                       THEN f.last_inbound_at ELSE contacts.last_inbound_at END,
                first_seen_at = CASE WHEN f.first_seen_at < COALESCE(contacts.first_seen_at, f.first_seen_at + 1)
                                     THEN f.first_seen_at ELSE contacts.first_seen_at END,
                profile_name = COALESCE(contacts.profile_name, f.profile_name),
                conversation = CASE WHEN f.conversation LIKE '{\"state\":\"order\"%'
                                         AND contacts.conversation NOT LIKE '{\"state\":\"order\"%'
                                    THEN f.conversation ELSE contacts.conversation END,
                updated_at = $3
             FROM (SELECT opted_out, marketing_opt_out, last_inbound_at, first_seen_at, profile_name, conversation, updated_at
                   FROM contacts WHERE wa_id = $2) AS f
             WHERE contacts.wa_id = $1",
        ),
        &[into_v.clone(), from_v.clone(), Value::Int(now_ms)],
    )?;
    db.execute(&d.sql("DELETE FROM send_leases WHERE wa_id = $1"), &[from_v.clone()])?;
    db.execute(&d.sql("DELETE FROM contacts WHERE wa_id = $1"), &[from_v])?;
    Ok(())
}

/// Where the contact `key`'s messages go now: its phone number when known, else its BSUID,
/// else its parent BSUID. `None` for a contact WhatsApp knows by nothing any more.
pub fn recipient<D: Db + ?Sized>(db: &D, key: &str) -> Result<Option<Recipient>, DbError> {
    let rows = db.query(
        &db.dialect().sql("SELECT phone, bsuid, parent_bsuid, wa_id, ids_known FROM contacts WHERE wa_id = $1"),
        &[Value::from(key)],
    )?;
    rows.first().map(recipient_of).transpose().map(Option::flatten)
}

/// What the sender needs of a contact before a send, read in one statement: whether they
/// opted out, when they last wrote (WhatsApp's 24-hour window) and where their messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFacts {
    pub opted_out: bool,
    pub last_inbound_at: Option<i64>,
    pub recipient: Option<Recipient>,
}

/// The contact `key`'s [`SendFacts`]; `None` if the app knows no such contact.
pub fn send_facts<D: Db + ?Sized>(db: &D, key: &str) -> Result<Option<SendFacts>, DbError> {
    let rows = db.query(
        &db.dialect().sql(
            "SELECT phone, bsuid, parent_bsuid, wa_id, ids_known, opted_out, last_inbound_at FROM contacts WHERE wa_id = $1",
        ),
        &[Value::from(key)],
    )?;
    let Some(r) = rows.first() else { return Ok(None) };
    Ok(Some(SendFacts { opted_out: r.int(5)? != 0, last_inbound_at: r.opt_int(6)?, recipient: recipient_of(r)? }))
}

/// The recipient of a contact row whose first columns are phone, bsuid, parent_bsuid, wa_id,
/// ids_known.
fn recipient_of(r: &crate::Row) -> Result<Option<Recipient>, DbError> {
    Ok(match (r.opt_text(0)?, r.opt_text(1)?, r.opt_text(2)?) {
        (Some(phone), _, _) => Some(Recipient::Phone(phone)),
        (None, Some(bsuid), _) => Some(Recipient::User(bsuid)),
        (None, None, Some(parent)) => Some(Recipient::User(parent)),
        // A row written by the previous release during a rollout: keyed by its phone.
        (None, None, None) if r.int(4)? == 0 => Some(Recipient::Phone(r.text(3)?)),
        // Its identifiers were taken (a number moved to another contact): nobody to send to.
        (None, None, None) => None,
    })
}

/// Records the user's marketing opt-out (or its withdrawal) on the contact `ids` name, if the
/// app knows them; answers whether it did.
pub fn set_marketing_opt_out<D: Db + ?Sized>(
    db: &D,
    ids: Ids<'_>,
    opted_out: bool,
    now_ms: i64,
) -> Result<bool, DbError> {
    let Some(key) = find(db, ids)? else { return Ok(false) };
    db.execute(
        &db.dialect().sql("UPDATE contacts SET marketing_opt_out = $1, updated_at = $2 WHERE wa_id = $3"),
        &[Value::Int(opted_out.into()), Value::Int(now_ms), Value::from(key.as_str())],
    )?;
    Ok(true)
}
