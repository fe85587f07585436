from decimal import Decimal

from django.core.management.base import BaseCommand

from inventory.services import product_upsert

DEMO_CATALOGUE = [
    ("TSHIRT-BLK-M", "T-shirt, black, M", "19.90", 100),
    ("HOODIE-GRY-L", "Hoodie, grey, L", "49.00", 40),
    ("MUG-LOGO", "Mug with logo", "9.50", 250),
    ("STICKER-PACK", "Sticker pack", "3.00", 1000),
    ("LAST-ONE", "Limited print (only 1 left)", "120.00", 1),
]


class Command(BaseCommand):
    help = "Create (or top up) the demo catalogue. Safe to run again: stock is reset to the demo levels."

    def handle(self, *args: object, **options: object) -> None:
        for sku, name, price, on_hand in DEMO_CATALOGUE:
            try:
                product_upsert(sku=sku, name=name, price=Decimal(price), on_hand=on_hand)
            except ValueError as error:
                # Units are reserved by live orders: keep the current stock level.
                self.stderr.write(f"kept stock of {sku}: {error}")
        self.stdout.write(f"demo catalogue ready: {len(DEMO_CATALOGUE)} products")
