// Save Erasure Patch shows where it saved the patch: the "text" its execution reports becomes a
// read-only line on the node (not saved with the workflow, so shared workflows keep their values).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "svare.SavedPatchPath",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SvareSaveErasurePatch") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join(" ");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "saved_to");
      if (!widget) {
        widget = this.addWidget("text", "saved_to", text, () => {}, { serialize: false });
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
