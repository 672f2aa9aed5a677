/*
 * TensorRT IPluginV3 binding of the StyleGAN2 modulated convolution (Karras et al., 2020).
 *
 * Identity (one identifier per custom op across every layer): ONNX domain "stylecast", op type and plugin name
 * "ModulatedConv2d", version "1", plugin namespace "stylecast".
 *
 * Inputs in order: x [N, I, H, W], weight [O, I, k, k], styles [N, I], then only the present optional ones in the
 * order noise [1 or N, 1, H*up, W*up], bias [O], skip [N, O, H*up/2, W*up/2].
 * Output: [N, O, H*up, W*up], same type as x. fp32 or fp16, linear (NCHW) layout, all tensors the same type.
 */
#pragma once

#include "NvInferRuntime.h"
#include "stylecast/modulatedConv2d.h"

#include <string>
#include <vector>

namespace stylecast
{
namespace plugin
{

constexpr char const* kPLUGIN_NAME = "ModulatedConv2d";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "stylecast";

//! Creation-time state of one layer: exactly the plugin fields of the ONNX contract.
struct ModulatedConv2dFields
{
    int32_t demodulate{1};
    int32_t up{1};
    int32_t act{0};
    float alpha{0.2F};
    float gain{1.0F};
    float clamp{-1.0F};
    int32_t hasNoise{0};
    int32_t hasBias{0};
    int32_t hasSkip{0};
    int32_t filterSize{0};
    std::vector<float> resampleFilter; //!< row-major [filterSize, filterSize]; empty when unused

    //! Number of plugin inputs these fields imply (3 + the optional ones).
    int32_t nbInputs() const noexcept
    {
        return 3 + hasNoise + hasBias + hasSkip;
    }

    //! Kernel attributes; call only on validated fields.
    ModConvAttributes attributes() const noexcept;
};

//! Parse a PluginFieldCollection (any integer or float field type is accepted and converted, because ONNX
//! parsers differ in how they map attribute types). Returns an empty string on success, else the reason.
std::string parseFields(nvinfer1::PluginFieldCollection const* fc, ModulatedConv2dFields& out);

//! Empty when the fields describe a valid layer, else the reason.
std::string validateFields(ModulatedConv2dFields const& fields);

class ModulatedConv2dPlugin : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit ModulatedConv2dPlugin(ModulatedConv2dFields fields);
    ModulatedConv2dPlugin(ModulatedConv2dPlugin const& other);
    ModulatedConv2dPlugin& operator=(ModulatedConv2dPlugin const&) = delete;
    ~ModulatedConv2dPlugin() override = default;

    ModulatedConv2dFields const& fields() const noexcept
    {
        return mFields;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    //! Shape of a call from per-input dims (as given, or the profile's max for the workspace).
    ModConvShape shapeFromDims(nvinfer1::Dims const* dims) const noexcept;
    //! Empty when the input dims (-1 = unknown) agree with the fields and with each other.
    std::string checkDims(nvinfer1::Dims const* dims, int32_t nbInputs, int32_t nbOutputs) const;
    void buildFieldsToSerialize();

    ModulatedConv2dFields mFields;
    ModConvAttributes mAttributes;
    std::string mDescription; //!< attribute summary: timing-cache id and metadata
    std::vector<nvinfer1::PluginField> mDataToSerialize;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
};

class ModulatedConv2dPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    ModulatedConv2dPluginCreator();
    ~ModulatedConv2dPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFC{};
};

} // namespace plugin
} // namespace stylecast
