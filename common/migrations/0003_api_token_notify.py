from django.conf import settings
from django.db import migrations

from common.notified_cache import notify_trigger, notify_trigger_sql

CHANNEL = "api_tokens"


def _user_triggers(forward: bool):
    """The triggers on the user model's table, whichever model AUTH_USER_MODEL names."""

    def run(apps, schema_editor) -> None:
        table = schema_editor.quote_name(apps.get_model(settings.AUTH_USER_MODEL)._meta.db_table)
        # A login's last_login is the one change of a user that no token depends on: logins
        # to the admin would otherwise empty every web process's cache.
        create, drop = notify_trigger_sql(
            table=table, channel=CHANNEL, columns=None, name="api_token_user", ignoring=["last_login"]
        )
        for statement in create if forward else drop:
            schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    """The web's token cache is emptied when a token or a user changes or goes
    (common.notified_cache): a revoked token, or a deactivated user, is refused at once."""

    dependencies = [("common", "0002_redundant_indexes"), migrations.swappable_dependency(settings.AUTH_USER_MODEL)]

    operations = [
        notify_trigger(table="common_apitoken", channel=CHANNEL, columns=None, name="api_token"),
        migrations.RunPython(_user_triggers(True), _user_triggers(False)),
    ]
