from django.db import migrations

from common.indexes import LIKE, DropRedundantIndexes


class Migration(migrations.Migration):
    """The LIKE twins of keys looked up only by equality (common.indexes)."""

    dependencies = [("payments", "0003_charge_attempts")]

    operations = [
        DropRedundantIndexes(
            "payments",
            [
                ("processedkey", "key", LIKE),
                ("fakeprovideroperation", "idempotency_key", LIKE),
                ("fakeprovideroperation", "reference", LIKE),
                ("fakeproviderattempt", "idempotency_key", LIKE),
            ],
        ),
    ]
