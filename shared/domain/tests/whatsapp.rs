//! WhatsApp webhook edge: handshake, signatures and payload parsing, with payloads shaped as
//! Meta documents them.

use astria_domain::conversation::Inbound;
use astria_domain::whatsapp::{
    parse_webhook, verify_signature, verify_subscription, DeliveryStatus, Identity, WebhookError,
};
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use sha2::Sha256;

const OUR_NUMBER: &str = "106540352242922";

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A webhook with one `messages` change for `phone_number_id`, carrying `messages` and `statuses`.
fn webhook(phone_number_id: &str, messages: &str, statuses: &str) -> String {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{{"field":"messages","value":{{
            "messaging_product":"whatsapp",
            "metadata":{{"display_phone_number":"15550783881","phone_number_id":"{phone_number_id}"}},
            "contacts":[{{"profile":{{"name":"Zoë"}},"wa_id":"16505551234"}}],
            "messages":[{messages}],"statuses":[{statuses}]}}}}]}}]}}"#
    )
}

fn message(id: &str, kind_and_body: &str) -> String {
    format!(r#"{{"from":"16505551234","id":"{id}","timestamp":"1739321024",{kind_and_body}}}"#)
}

#[test]
fn the_handshake_answers_the_challenge_only_for_the_right_token() {
    assert_eq!(verify_subscription(Some("subscribe"), Some("tok"), Some("1158201444"), "tok"), Some("1158201444"));
    assert_eq!(verify_subscription(Some("subscribe"), Some("nope"), Some("c"), "tok"), None);
    assert_eq!(verify_subscription(Some("unsubscribe"), Some("tok"), Some("c"), "tok"), None);
    assert_eq!(verify_subscription(Some("subscribe"), None, Some("c"), "tok"), None);
    assert_eq!(
        verify_subscription(Some("subscribe"), Some(""), Some("c"), ""),
        None,
        "an unset token verifies nothing"
    );
}

#[test]
fn a_signature_verifies_only_for_its_own_body_and_secret() {
    let body = webhook(OUR_NUMBER, &message("wamid.1", r#""type":"text","text":{"body":"hi 📸"}"#), "");
    let good = sign("app-secret", body.as_bytes());
    assert_eq!(verify_signature("app-secret", body.as_bytes(), Some(&good)), Ok(()));
    assert_eq!(verify_signature("other-secret", body.as_bytes(), Some(&good)), Err(WebhookError::BadSignature));
    assert_eq!(verify_signature("app-secret", b"{}", Some(&good)), Err(WebhookError::BadSignature));
    assert_eq!(verify_signature("app-secret", body.as_bytes(), None), Err(WebhookError::BadSignature));
    assert_eq!(verify_signature("app-secret", body.as_bytes(), Some("sha256=zz")), Err(WebhookError::BadSignature));
    assert_eq!(verify_signature("app-secret", body.as_bytes(), Some(&good[7..])), Err(WebhookError::BadSignature));
    assert_eq!(
        verify_signature("", body.as_bytes(), Some(&sign("", body.as_bytes()))),
        Err(WebhookError::BadSignature)
    );
}

#[test]
fn text_image_and_replies_become_inbound_messages() {
    let messages = [
        message("wamid.t", r#""type":"text","text":{"body":"hi"}"#),
        message("wamid.i", r#""type":"image","image":{"caption":"me","mime_type":"image/jpeg","sha256":"abc123","id":"1479537139650973"}"#),
        message("wamid.b", r#""context":{"from":"15550783881","id":"wamid.prev"},"type":"interactive","interactive":{"type":"button_reply","button_reply":{"id":"done","title":"Done"}}"#),
        message("wamid.l", r#""type":"interactive","interactive":{"type":"list_reply","list_reply":{"id":"pack:corporate","title":"Corporate","description":"19.99 USD"}}"#),
        message("wamid.q", r#""type":"button","button":{"payload":"status","text":"Status"}"#),
        message("wamid.s", r#""type":"sticker","sticker":{"mime_type":"image/webp","sha256":"x","id":"9","animated":false}"#),
    ]
    .join(",");
    let parsed = parse_webhook(webhook(OUR_NUMBER, &messages, "").as_bytes(), OUR_NUMBER).unwrap();
    let got: Vec<_> = parsed.messages.iter().map(|m| (m.id.as_str(), m.inbound.clone())).collect();
    assert_eq!(got[0], ("wamid.t", Inbound::Text("hi".into())));
    assert!(
        matches!(&got[1].1, Inbound::Image(p) if p.media_id == "1479537139650973" && p.mime_type == "image/jpeg" && p.sha256 == "abc123")
    );
    assert_eq!(got[2].1, Inbound::Reply { id: "done".into(), title: "Done".into() });
    assert_eq!(got[3].1, Inbound::Reply { id: "pack:corporate".into(), title: "Corporate".into() });
    assert_eq!(got[4].1, Inbound::Reply { id: "status".into(), title: "Status".into() });
    assert_eq!(got[5].1, Inbound::Other("sticker".into()));
    let first = &parsed.messages[0];
    assert_eq!(
        (first.sender.phone.as_deref(), first.profile_name.as_deref(), first.timestamp),
        (Some("16505551234"), Some("Zoë"), 1739321024)
    );
}

const BSUID: &str = "US.13491208655302741918";

/// A webhook from a customer with a username: no `wa_id`, no `from`.
fn username_webhook(messages: &str) -> String {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{
            "messaging_product":"whatsapp",
            "metadata":{{"display_phone_number":"15550783881","phone_number_id":"{OUR_NUMBER}"}},
            "contacts":[{{"profile":{{"name":"Ana","username":"ana.photos"}},"user_id":"{BSUID}","parent_user_id":"US.ENT.11815799212886844830"}}],
            "messages":[{messages}]}}}}]}}]}}"#
    )
}

#[test]
fn a_customer_with_a_username_is_known_by_their_bsuid_and_their_contact_completes_it() {
    let m = format!(
        r#"{{"from_user_id":"{BSUID}","id":"wamid.u","timestamp":"1767000000","type":"text","text":{{"body":"hi"}}}}"#
    );
    let parsed = parse_webhook(username_webhook(&m).as_bytes(), OUR_NUMBER).unwrap();
    let got = &parsed.messages[0];
    assert_eq!(
        got.sender,
        Identity { phone: None, bsuid: Some(BSUID.into()), parent_bsuid: Some("US.ENT.11815799212886844830".into()) }
    );
    assert_eq!((got.profile_name.as_deref(), &got.inbound), (Some("Ana"), &Inbound::Text("hi".into())));
    assert_eq!(format!("{:?}", got.sender).contains("1349"), false, "an identity's Debug names no identifier");

    // Both shapes at once: phone and BSUID on one sender.
    let both = webhook(
        OUR_NUMBER,
        &message("wamid.b", &format!(r#""from_user_id":"{BSUID}","type":"text","text":{{"body":"hi"}}"#)),
        "",
    );
    let sender = &parse_webhook(both.as_bytes(), OUR_NUMBER).unwrap().messages[0].sender;
    assert_eq!((sender.phone.as_deref(), sender.bsuid.as_deref()), (Some("16505551234"), Some(BSUID)));
}

#[test]
fn a_message_naming_no_sender_or_a_malformed_one_is_refused() {
    let none = r#"{"id":"wamid.n","timestamp":"1767000000","type":"text","text":{"body":"hi"}}"#;
    let bad_bsuid =
        r#"{"from_user_id":"not a bsuid","id":"wamid.n","timestamp":"1767000000","type":"text","text":{"body":"hi"}}"#;
    let bad_phone = r#"{"from":"+1 650","id":"wamid.n","timestamp":"1767000000","type":"text","text":{"body":"hi"}}"#;
    for m in [none, bad_bsuid, bad_phone] {
        let body = username_webhook(m)
            .replace(&format!(r#""user_id":"{BSUID}","#), "")
            .replace(r#""parent_user_id":"US.ENT.11815799212886844830""#, r#""x":1"#);
        assert!(matches!(parse_webhook(body.as_bytes(), OUR_NUMBER), Err(WebhookError::Malformed(_))), "{m}");
    }
}

#[test]
fn kinds_the_bot_cannot_use_are_other_and_kinds_that_change_nothing_are_ignored() {
    let messages = [
        message("wamid.f", r#""type":"interactive","interactive":{"type":"nfm_reply","nfm_reply":{"name":"flow","body":"Sent","response_json":"{\"flow_token\":\"t\"}"}}"#),
        message("wamid.c", r#""type":"interactive","interactive":{"type":"call_permission_reply","call_permission_reply":{"response":"accept"}}"#),
        message("wamid.e", r#""type":"interactive","errors":[{"code":131051,"title":"Unsupported"}]"#),
        message("wamid.r", r#""type":"reaction","reaction":{"message_id":"wamid.x","emoji":""}"#),
        message("wamid.v", r#""type":"audio","audio":{"mime_type":"audio/ogg","sha256":"x","id":"1","voice":true}"#),
        message("wamid.x", r#""type":"text""#),
    ]
    .join(",");
    let parsed = parse_webhook(webhook(OUR_NUMBER, &messages, "").as_bytes(), OUR_NUMBER).unwrap();
    let got: Vec<_> = parsed.messages.iter().map(|m| m.inbound.clone()).collect();
    assert_eq!(
        got,
        [
            Inbound::Other("interactive:nfm_reply".into()),
            Inbound::Other("interactive:call_permission_reply".into()),
            Inbound::Other("interactive:unknown".into()),
            Inbound::Ignored("reaction".into()),
            Inbound::Other("audio".into()),
            Inbound::Other("text".into()),
        ]
    );
}

#[test]
fn a_number_change_announces_the_new_identity_and_preferences_are_read() {
    let change = message(
        "wamid.sys",
        r#""type":"system","system":{"body":"changed","wa_id":"16505559876","user_id":"US.48120937561029384756","type":"user_changed_number"}"#,
    );
    let parsed = parse_webhook(webhook(OUR_NUMBER, &change, "").as_bytes(), OUR_NUMBER).unwrap();
    let m = &parsed.messages[0];
    assert_eq!(m.inbound, Inbound::Ignored("system".into()));
    let new = m.identity_change.clone().unwrap();
    assert_eq!((new.phone.as_deref(), new.bsuid.as_deref()), (Some("16505559876"), Some("US.48120937561029384756")));

    let prefs = format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"user_preferences","value":{{
            "messaging_product":"whatsapp","metadata":{{"display_phone_number":"1","phone_number_id":"{OUR_NUMBER}"}},
            "user_preferences":[{{"wa_id":"16505551234","user_id":"{BSUID}","category":"marketing_messages","value":"stop","timestamp":1767003300}}]}}}}]}}]}}"#
    );
    let parsed = parse_webhook(prefs.as_bytes(), OUR_NUMBER).unwrap();
    assert_eq!(parsed.preferences.len(), 1);
    assert!(parsed.preferences[0].opted_out);
    assert_eq!(parsed.preferences[0].category, "marketing_messages");
}

#[test]
fn a_status_for_a_send_to_a_bsuid_names_the_user_id_only() {
    let statuses = format!(
        r#"{{"id":"wamid.o","status":"read","timestamp":"1767000000","recipient_user_id":"{BSUID}"}},
        {{"id":"wamid.p","status":"played","timestamp":"1767000001","recipient_id":"120363041234567890","recipient_type":"group"}}"#
    );
    let parsed = parse_webhook(webhook(OUR_NUMBER, "", &statuses).as_bytes(), OUR_NUMBER).unwrap();
    assert_eq!(parsed.statuses[0].recipient.bsuid.as_deref(), Some(BSUID));
    assert_eq!(parsed.statuses[0].status, DeliveryStatus::Read);
    assert_eq!(parsed.statuses[1].status, DeliveryStatus::Played);
    assert!(parsed.statuses[1].recipient.is_empty(), "a group's status names no person");
}

#[test]
fn statuses_are_parsed_with_their_error_codes() {
    let statuses = r#"{"id":"wamid.out1","status":"delivered","timestamp":"1739321100","recipient_id":"16505551234"},
        {"id":"wamid.out2","status":"failed","timestamp":"1739321101","recipient_id":"16505551234",
         "errors":[{"code":131047,"title":"Re-engagement message","message":"Re-engagement message","error_data":{"details":"Message failed to send because more than 24 hours have passed"}}]}"#;
    let parsed = parse_webhook(webhook(OUR_NUMBER, "", statuses).as_bytes(), OUR_NUMBER).unwrap();
    assert_eq!(parsed.statuses.len(), 2);
    assert_eq!((parsed.statuses[0].status.as_str(), parsed.statuses[0].error_codes.len()), ("delivered", 0));
    assert_eq!(parsed.statuses[0].recipient.phone.as_deref(), Some("16505551234"));
    assert_eq!(parsed.statuses[1].error_codes, vec![131047]);
}

#[test]
fn other_numbers_and_other_fields_are_ignored() {
    let msg = message("wamid.x", r#""type":"text","text":{"body":"hi"}"#);
    let other_number = parse_webhook(webhook("999", &msg, "").as_bytes(), OUR_NUMBER).unwrap();
    assert!(other_number.messages.is_empty());
    let other_field = r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"account_update","value":{"event":"VERIFIED_ACCOUNT"}}]}]}"#;
    assert_eq!(parse_webhook(other_field.as_bytes(), OUR_NUMBER).unwrap().messages.len(), 0);
}

#[test]
fn malformed_bodies_have_typed_errors() {
    for bad in [
        "",
        "not json",
        r#"{"object":"page","entry":[]}"#,
        // (A text without its text is answered as a kind the bot cannot read: see
        // kinds_the_bot_cannot_use_are_other_and_kinds_that_change_nothing_are_ignored.)
        &webhook(OUR_NUMBER, r#"{"from":"1","id":"w","timestamp":"yesterday","type":"text","text":{"body":"x"}}"#, ""),
    ] {
        assert!(matches!(parse_webhook(bad.as_bytes(), OUR_NUMBER), Err(WebhookError::Malformed(_))), "{bad}");
    }
}

proptest! {
    #[test]
    fn arbitrary_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse_webhook(&bytes, OUR_NUMBER);
        let _ = verify_signature("secret", &bytes, Some("sha256=00"));
    }

    #[test]
    fn arbitrary_text_messages_round_trip(body in "\\PC{0,200}", id in "[a-zA-Z0-9.=_-]{1,40}") {
        let text = serde_json::json!({"body": body}).to_string();
        let raw = webhook(OUR_NUMBER, &message(&id, &format!(r#""type":"text","text":{text}"#)), "");
        let parsed = parse_webhook(raw.as_bytes(), OUR_NUMBER).unwrap();
        prop_assert_eq!(&parsed.messages[0].inbound, &Inbound::Text(body));
    }

    #[test]
    fn any_change_to_a_signed_body_breaks_the_signature(body in prop::collection::vec(any::<u8>(), 1..256), flip in any::<usize>()) {
        let sig = sign("s3cret", &body);
        prop_assert!(verify_signature("s3cret", &body, Some(&sig)).is_ok());
        let mut tampered = body.clone();
        let i = flip % tampered.len();
        tampered[i] ^= 0x01;
        prop_assert_eq!(verify_signature("s3cret", &tampered, Some(&sig)), Err(WebhookError::BadSignature));
    }
}

#[test]
fn a_body_with_a_nul_character_is_malformed() {
    let raw = webhook(OUR_NUMBER, &message("wamid.n", r#""type":"text","text":{"body":"a\u0000b"}"#), "");
    assert!(matches!(parse_webhook(raw.as_bytes(), OUR_NUMBER), Err(WebhookError::Malformed(_))));
    let stripe = br#"{"id":"evt_\u0000","type":"checkout.session.completed","data":{"object":{}}}"#;
    assert!(astria_domain::stripe::parse_event(stripe).is_err());
    assert!(!astria_domain::has_nul_escape(br#"{"a":"u0000 and \\n are fine"}"#));
}
