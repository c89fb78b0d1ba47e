"""Model-free evaluation support: task data, prompt formats and scoring metrics."""
