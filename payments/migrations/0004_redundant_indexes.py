from django.db import migrations

from common.indexes import DropLikeIndexes


class Migration(migrations.Migration):
    """The LIKE twins of keys looked up only by equality (common.indexes)."""

    dependencies = [("payments", "0003_charge_attempts")]

    operations = [
        DropLikeIndexes(
            "payments",
            [
                ("processedkey", "key"),
                ("fakeprovideroperation", "idempotency_key"),
                ("fakeprovideroperation", "reference"),
                ("fakeproviderattempt", "idempotency_key"),
            ],
        ),
    ]
