"""vicuna-demo: a Gradio research demo for chat models with an anonymous battle arena."""
