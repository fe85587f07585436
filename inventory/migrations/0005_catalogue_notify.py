from django.db import migrations

from common.notified_cache import notify_trigger


class Migration(migrations.Migration):
    """The web's catalogue cache is emptied when a product's SKU, name or price changes, or
    a product goes (common.notified_cache); a reservation's stock update notifies nothing."""

    dependencies = [("inventory", "0004_redundant_indexes")]

    operations = [
        notify_trigger(table="inventory_product", channel="catalogue", columns=["sku", "name", "price"], name="catalogue")
    ]
