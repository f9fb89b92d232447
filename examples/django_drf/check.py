"""Run the example in a scratch directory (``python -m examples.django_drf.check``): create its databases, log two
users in with Django's session (DRF's ``APIClient.force_login``), and send keyed requests twice. Prints one line per
fact it checked, and fails (an AssertionError) if one does not hold."""

from __future__ import annotations

import os
import tempfile
import uuid


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        os.environ["DRF_EXAMPLE_DIR"] = directory
        os.environ["DJANGO_SETTINGS_MODULE"] = "examples.django_drf.settings"
        import django

        django.setup()
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from rest_framework.test import APIClient

        from .models import Order, Payment

        call_command("migrate", run_syncdb=True, verbosity=0)
        alice, bob = APIClient(), APIClient()
        alice.force_login(User.objects.create(username="alice"))
        bob.force_login(User.objects.create(username="bob"))

        key = str(uuid.uuid4())
        order = {"sku": "book", "quantity": 2}
        first = alice.post("/api/orders/", order, format="json", headers={"Idempotency-Key": key})
        again = alice.post("/api/orders/", order, format="json", headers={"Idempotency-Key": key})
        assert first.status_code == 201, first.content
        assert again.content == first.content
        assert again.headers["Idempotent-Replayed"] == "true"
        assert first.json()["idempotency_key"] == key
        print("the ViewSet's create ran once; the retry got its response, replayed:", Order.objects.count())

        bobs = bob.post("/api/orders/", order, format="json", headers={"Idempotency-Key": key})
        assert bobs.status_code == 201
        assert "Idempotent-Replayed" not in bobs.headers
        print("another user's same key is their own:", Order.objects.count())

        reused = alice.post(
            "/api/orders/", {"sku": "pen", "quantity": 1}, format="json", headers={"Idempotency-Key": key}
        )
        assert reused.status_code == 422
        print("the same key with another body:", reused.status_code, reused.headers["Content-Type"])

        pay = f"/api/orders/{first.json()['id']}/pay"
        pay_key = {"Idempotency-Key": str(uuid.uuid4())}
        paid = alice.post(pay, {"amount_cents": 1250}, format="json", headers=pay_key)
        paid_again = alice.post(pay, {"amount_cents": 1250}, format="json", headers=pay_key)
        assert paid.status_code == paid_again.status_code == 201
        assert paid_again.content == paid.content
        assert Payment.objects.count() == 1
        print("the APIView's post ran once:", Payment.objects.count())

        unkeyed = alice.post("/api/orders/", order, format="json")
        assert unkeyed.status_code == 400
        print("a POST to /api/ without a key:", unkeyed.status_code)
        assert Order.objects.count() == 2


if __name__ == "__main__":
    main()
