"""Module names of diffusers' Flux2Transformer2DModel (0.42.1) that the backend and the planner share.

Double block (D = hidden, m = int(D·mlp_ratio); every Linear without bias): attn.to_q/to_k/to_v/to_out.0 and
attn.add_q_proj/add_k_proj/add_v_proj/to_add_out (D -> D), ff.linear_in / ff_context.linear_in (D -> 2m, SwiGLU),
ff.linear_out / ff_context.linear_out (m -> D). Single block: attn.to_qkv_mlp_proj (D -> 3D + 2m) and attn.to_out
(D + m -> D). The modulations (double_stream_modulation_img/txt: D -> 12D, single_stream_modulation: D -> 6D) are
computed once per forward and shared by every block.
"""

DOUBLE_LORA = (r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
               r"|ff\.linear_(in|out)|ff_context\.linear_(in|out)")
SINGLE_LORA = r"attn\.(to_qkv_mlp_proj|to_out)"
LORA_TARGETS = (rf"transformer_blocks\.\d+\.({DOUBLE_LORA})", rf"single_transformer_blocks\.\d+\.({SINGLE_LORA})")
BLOCKS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"
MODULATIONS = r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"
COMPRESS = (BLOCKS, MODULATIONS)  # what one --ratio compresses: every block's linears and the three modulations
PASS_ENTRY = ("x_embedder", "context_embedder", "time_guidance_embed")  # read as samples enter the streamed pass
