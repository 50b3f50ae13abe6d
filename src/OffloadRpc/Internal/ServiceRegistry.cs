using System.ComponentModel;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// What the generator knows about one service: its name, contract hash, method ids, and how to make
/// its proxy and stub. Registered by a generated module initializer; no reflection at run time.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public abstract class ServiceDescriptor
{
    private protected ServiceDescriptor(string name, ulong contractHash, MethodDescriptor[] methods)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(methods);
        Name = name;
        ContractHash = contractHash;
        Methods = methods;
    }

    /// <summary>The interface's full name; the key both sides compare.</summary>
    public string Name { get; }

    /// <summary>A hash of every method's name, parameter and return types: equal on both sides or the connection is refused.</summary>
    public ulong ContractHash { get; }

    /// <summary>The service's methods, each with its stable id (from its signature).</summary>
    public IReadOnlyList<MethodDescriptor> Methods { get; }
}

/// <summary>The descriptor of service <typeparamref name="TService"/>.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class ServiceDescriptor<TService> : ServiceDescriptor
    where TService : class
{
    private readonly Func<CallInvoker, TService> _createProxy;
    private readonly Func<TService, ServiceStub> _createStub;

    public ServiceDescriptor(string name, ulong contractHash, MethodDescriptor[] methods, Func<CallInvoker, TService> createProxy, Func<TService, ServiceStub> createStub)
        : base(name, contractHash, methods)
    {
        _createProxy = createProxy ?? throw new ArgumentNullException(nameof(createProxy));
        _createStub = createStub ?? throw new ArgumentNullException(nameof(createStub));
    }

    internal TService CreateProxy(CallInvoker invoker) => _createProxy(invoker);

    internal ServiceStub CreateStub(TService implementation) => _createStub(implementation);

    /// <summary>A stub without an implementation: each call gets one from the factory the service was registered with.</summary>
    internal ServiceStub CreatePerCallStub() => _createStub(null!);
}

/// <summary>The services compiled into this process, registered by generated module initializers.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public static class ServiceRegistry
{
    private static readonly object s_lock = new();
    private static ContractDescriptor[] s_contracts = [];

    /// <summary>Called by generated code at module load.</summary>
    public static void Register<TService>(ServiceDescriptor<TService> descriptor)
        where TService : class
    {
        ArgumentNullException.ThrowIfNull(descriptor);
        lock (s_lock)
        {
            Holder<TService>.Descriptor = descriptor;
            var contracts = new List<ContractDescriptor>(s_contracts.Where(c => c.Name != descriptor.Name))
            {
                new(descriptor.Name, descriptor.ContractHash),
            };
            s_contracts = [.. contracts];
        }
    }

    /// <summary>
    /// The descriptor of <typeparamref name="TService"/>. A module initializer runs only once code of its
    /// assembly runs, and naming an interface type is not enough; so when nothing is registered yet,
    /// this runs the interface's module initializer explicitly (NativeAOT has already run it at start-up).
    /// </summary>
    internal static ServiceDescriptor<TService>? Find<TService>()
        where TService : class
    {
        ServiceDescriptor<TService>? descriptor = Holder<TService>.Descriptor;
        if (descriptor is null)
        {
            System.Runtime.CompilerServices.RuntimeHelpers.RunModuleConstructor(typeof(TService).Module.ModuleHandle);
            descriptor = Holder<TService>.Descriptor;
        }

        return descriptor;
    }

    internal static IReadOnlyList<ContractDescriptor> Contracts() => Volatile.Read(ref s_contracts);

    /// <summary>A generic static per service type: lookup without a dictionary or reflection (NativeAOT-safe).</summary>
    private static class Holder<TService>
        where TService : class
    {
        public static ServiceDescriptor<TService>? Descriptor;
    }
}
