"""The Streamlit dashboard over the tuning database."""
