"""The ops dashboard served by the router at /dashboard (router/dashboard/app.py; the page is in static/)."""
