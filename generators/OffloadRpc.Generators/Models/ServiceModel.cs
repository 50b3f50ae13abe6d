namespace OffloadRpc.Generators.Models;

/// <summary>
/// Everything the emitter needs about one [OffloadService] interface. Immutable, with structural
/// equality, holding no symbol, syntax node or compilation, so the pipeline caches it across edits.
/// </summary>
internal sealed record ServiceModel(
    string Namespace,
    string HintPrefix,
    string InterfaceName,
    string InterfaceType,
    string ServiceName,
    string ProxyName,
    string StubName,
    string RegistrationName,
    string Accessibility,
    ulong ContractHash,
    EquatableArray<MethodModel> Methods);

/// <summary>How a method returns: Task, ValueTask, Task&lt;T&gt;, ValueTask&lt;T&gt; or IAsyncEnumerable&lt;T&gt;.</summary>
internal enum ReturnShape
{
    Task,
    ValueTask,
    TaskOfT,
    ValueTaskOfT,

    /// <summary>IAsyncEnumerable&lt;T&gt;: a streamed result, one item at a time (<see cref="MethodModel.Result"/> is the item).</summary>
    AsyncEnumerable,
}

/// <param name="ResultTransfer">The [Transfer] choice for a buffer result (from the method's attribute), as emitted arguments, or null for Auto.</param>
internal sealed record MethodModel(
    string Name,
    int MethodId,
    ReturnShape Shape,
    string ReturnType,
    ValueModel? Result,
    EquatableArray<ParameterModel> Parameters,
    string? CancellationTokenName,
    string? ResultTransfer);

/// <param name="Transfer">The [Transfer] choice for a buffer (parameter's, else the method's), as emitted arguments ("global::OffloadRpc.TransferMode.X, global::OffloadRpc.CachePolicy.Y"), or null for Auto.</param>
internal sealed record ParameterModel(string Name, string Type, ValueModel Value, string? Transfer);

/// <summary>How a value crosses: fast MessagePack primitives, MessagePack, an enum, or a buffer through the arena.</summary>
internal enum ValueKind
{
    /// <summary>A type MessagePackWriter/Reader handle directly (bool, integers, floats, char, string).</summary>
    Primitive,

    /// <summary>An enum, written as its underlying integer.</summary>
    Enum,

    /// <summary>Anything else: MessagePackSerializer with OffloadRpc's options.</summary>
    MessagePack,

    /// <summary>ReadOnlyMemory&lt;T&gt; of unmanaged T: the arena; in shared memory on the server.</summary>
    ReadOnlyMemory,

    /// <summary>Memory&lt;T&gt; of unmanaged T: the arena; in shared memory on the server.</summary>
    Memory,

    /// <summary>T[] of unmanaged T: the arena; a managed copy on the other side.</summary>
    Array,

    /// <summary>SharedBuffer: ownership moves, no copy.</summary>
    SharedBuffer,

    /// <summary>Stream: the server method starts at the first chunk and reads the rest as it lands (Pipelined).</summary>
    Stream,

    /// <summary>IAsyncEnumerable&lt;ReadOnlyMemory&lt;byte&gt;&gt;: like Stream, chunk by chunk.</summary>
    Chunks,

    /// <summary>IAsyncEnumerable&lt;T&gt; of any other T: a streamed argument, item by item (<see cref="ValueModel.Item"/> says how each crosses).</summary>
    Items,
}

/// <param name="Type">The fully qualified type, as written in emitted code.</param>
/// <param name="Primitive">For Primitive: the MessagePackReader method suffix (Int32, String, ...); for Enum: the underlying type's.</param>
/// <param name="ElementType">For buffers of T: T, fully qualified.</param>
/// <param name="IsNullable">The declared type allows null (reference types annotated with '?').</param>
/// <param name="WireType">The type as it affects the wire (Nullable&lt;T&gt; kept, reference nullability dropped): part of ids and the contract hash.</param>
/// <param name="IsReference">A reference type: a non-nullable one read as null is a protocol violation.</param>
internal sealed record ValueModel(ValueKind Kind, string Type, string WireType, string? Primitive, string? ElementType, string? UnderlyingType, bool IsNullable, bool IsReference)
{
    /// <summary>For Items: how each item crosses.</summary>
    public ValueModel? Item { get; init; }
}
