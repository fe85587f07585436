from django.db import migrations

from common.indexes import DropLikeIndexes


class Migration(migrations.Migration):
    """The processed key's LIKE twin: it is looked up only by equality (common.indexes)."""

    dependencies = [("notifications", "0002_notification_claim")]

    operations = [DropLikeIndexes("notifications", [("processedkey", "key")])]
