"""Provider adapters by config `type:` name.

Modules are imported on first use so that a bridge configured for one API does not
import the SDK helpers of the other nine.
"""

from __future__ import annotations

import importlib

from bridge.providers.base import Provider, ProviderSettings

__all__ = ["REGISTRY", "Provider", "ProviderSettings", "get"]

#: type name → "module:Class"
REGISTRY: dict[str, str] = {
    "webhook": "bridge.providers.webhook:WebhookProvider",
    "sendgrid": "bridge.providers.sendgrid:SendGridProvider",
    "mailgun": "bridge.providers.mailgun:MailgunProvider",
    "postmark": "bridge.providers.postmark:PostmarkProvider",
    "ses": "bridge.providers.ses:SESProvider",
    "graph": "bridge.providers.graph:GraphProvider",
    "gmail": "bridge.providers.gmail:GmailProvider",
    "resend": "bridge.providers.resend:ResendProvider",
    "brevo": "bridge.providers.brevo:BrevoProvider",
    "mailjet": "bridge.providers.mailjet:MailjetProvider",
    "sparkpost": "bridge.providers.sparkpost:SparkPostProvider",
}


def get(type_name: str) -> type[Provider[ProviderSettings]]:
    """The adapter class for a config `type:`; raises KeyError for an unknown one."""
    target = REGISTRY[type_name]
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Provider[ProviderSettings]] = getattr(module, class_name)
    return cls
