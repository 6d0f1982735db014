"""Example apps shipped with evserver; ``evserver serve evserver.examples.shop:app`` runs one."""
