"""The ops dashboard served by the router at /dashboard (ops/dashboard/app.py; the page is in static/)."""
