//! Every sentence the bot says, in one place, so an operator can change the wording without
//! touching logic: the defaults below can be overridden, field by field, with a JSON object in
//! the `texts_json` variable. Placeholders in braces are filled by [`fill`].

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Texts {
    pub greeting: String,
    pub pack_list_button: String,
    pub pack_list_section: String,
    pub choose_subject: String,
    pub unknown_pack: String,
    pub unknown_subject: String,
    /// `{min}`, `{max}`, `{pack}`.
    pub send_photos: String,
    /// `{count}`, `{max}`.
    pub photo_received: String,
    /// `{count}`: shown once the minimum is reached, with a "done" button.
    pub photo_minimum_reached: String,
    pub done_button: String,
    pub duplicate_photo: String,
    pub unsupported_image: String,
    /// `{max}`.
    pub too_many_photos: String,
    /// `{missing}`.
    pub need_more_photos: String,
    pub expecting_photo: String,
    /// `{price}`.
    pub preparing_payment: String,
    /// `{url}`.
    pub payment_link: String,
    pub payment_link_pending: String,
    pub in_progress: String,
    pub training: String,
    pub delivering: String,
    pub delivered_offer_more: String,
    pub cancelled: String,
    pub nothing_to_cancel: String,
    pub cannot_cancel_paid: String,
    pub help: String,
    pub stopped: String,
    pub restarted: String,
    pub unsupported_message: String,
    pub failed: String,
    /// After the payment settled the order.
    pub payment_received: String,
    /// The Checkout session lapsed unpaid.
    pub payment_expired: String,
    /// A delayed payment method failed.
    pub payment_failed: String,
    /// Money arrived that the order could not take (wrong amount, cancelled order).
    pub payment_needs_refund: String,
    /// The photos would be gone (WhatsApp keeps media 7 days) before training could start.
    pub photos_too_old: String,
    /// Stripe took the refund of a payment the bot could not use: `{amount}`.
    pub refund_issued: String,
}

impl Default for Texts {
    fn default() -> Self {
        let s = |t: &str| t.to_string();
        Texts {
            greeting: s("Hi! I turn your selfies into professional AI portraits. Pick a photo pack to start:"),
            pack_list_button: s("See packs"),
            pack_list_section: s("Photo packs"),
            choose_subject: s("Who is in the photos?"),
            unknown_pack: s("Sorry, I don't know that pack. Please pick one from the list."),
            unknown_subject: s("Please pick one of the options."),
            send_photos: s("Great choice: {pack}. Send me {min} to {max} clear selfies, one face, good light."),
            photo_received: s("Got it ({count}/{max})."),
            photo_minimum_reached: s("Got {count} photos. Send more for better results, or tap Done."),
            done_button: s("Done"),
            duplicate_photo: s("I already have that photo; please send a different one."),
            unsupported_image: s("Please send photos as JPEG or PNG images."),
            too_many_photos: s("That's the maximum of {max} photos. Tap Done to continue."),
            need_more_photos: s("I need {missing} more photo(s) before we can continue."),
            expecting_photo: s("Please send your selfies as photos (not files or stickers)."),
            preparing_payment: s("Thanks! Your order is {price}. I'm preparing your secure payment link…"),
            payment_link: s("Pay securely here: {url}"),
            payment_link_pending: s("Your payment link is on its way."),
            in_progress: s("Your portraits are on their way. I'll message you when they're ready."),
            training: s(
                "Your AI model is training. This takes a little while; I'll send your portraits when they're ready.",
            ),
            delivering: s("Your portraits are ready and being sent now."),
            delivered_offer_more: s("Your portraits have been delivered. Want another pack? Reply MENU."),
            cancelled: s("Your order is cancelled. Reply MENU to start again."),
            nothing_to_cancel: s("There's nothing to cancel. Reply MENU to see the packs."),
            cannot_cancel_paid: s(
                "Your order is paid and in progress, so it can't be cancelled here. Reply HELP to reach us.",
            ),
            help: s(
                "Commands: MENU (packs), STATUS, CANCEL (before paying), DONE (after photos), STOP (no more messages).",
            ),
            stopped: s("You won't receive more messages. Reply START to resume."),
            restarted: s("Welcome back! Reply MENU to see the packs."),
            unsupported_message: s("Sorry, I can't read that kind of message."),
            failed: s("Something went wrong with your order. We'll refund you and get in touch."),
            payment_received: s("Payment received, thank you! Your AI model starts training now; I'll send your portraits when they're ready."),
            payment_expired: s("Your payment link has expired. Reply PAY for a new one, or MENU to start over."),
            payment_failed: s("Your payment didn't go through. Reply PAY to try again, or MENU to start over."),
            photos_too_old: s("WhatsApp only keeps photos for 7 days and yours are nearly that old, so I can't use them. Reply MENU to start again with fresh selfies."),
            payment_needs_refund: s("We received a payment we couldn't match to your order. We'll refund it and get in touch."),
            refund_issued: s("Your refund of {amount} is on its way back to you. Your bank may take 5 to 10 days to show it."),
        }
    }
}

impl Texts {
    /// The defaults with the fields of `json` (an object) replacing theirs.
    pub fn from_json_overrides(json: &str) -> Result<Texts, String> {
        if json.trim().is_empty() {
            return Ok(Texts::default());
        }
        serde_json::from_str(json).map_err(|e| format!("texts_json: {e}"))
    }
}

/// Replaces `{name}` placeholders.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_the_fields_given() {
        let t = Texts::from_json_overrides(r#"{"help": "Ask us anything."}"#).unwrap();
        assert_eq!(t.help, "Ask us anything.");
        assert_eq!(t.greeting, Texts::default().greeting);
    }

    #[test]
    fn unknown_override_keys_are_refused_with_the_variable_name() {
        let err = Texts::from_json_overrides(r#"{"helpp": "x"}"#).unwrap_err();
        assert!(err.contains("texts_json") && err.contains("helpp"), "{err}");
    }

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(fill("{a} and {b}", &[("a", "1"), ("b", "2")]), "1 and 2");
    }
}
