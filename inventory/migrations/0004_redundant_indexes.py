from django.db import migrations, models

from common.indexes import DropLikeIndexes


class Migration(migrations.Migration):
    """Indexes no query needs (common.indexes): the reservation's own index on its saga (the
    unique (saga, sku) starts with it) and the processed key's LIKE twin."""

    dependencies = [("inventory", "0003_reservation_sold")]

    operations = [
        migrations.AlterField(model_name="reservation", name="saga_id", field=models.UUIDField()),
        DropLikeIndexes("inventory", [("processedkey", "key")]),
    ]
