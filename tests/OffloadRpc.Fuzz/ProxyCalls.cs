using System.Reflection;
using System.Runtime.CompilerServices;
using OffloadRpc.Internal;
using OffloadRpc.TestContracts;
using OffloadRpc.Transport;

namespace OffloadRpc.Fuzz;

/// <summary>Calls a contract method through its generated proxy with harmless arguments (the reply target and the seed generator).</summary>
internal static class ProxyCalls
{
    private static readonly Type[] s_contracts = [typeof(IFuzzContract), typeof(IKitchenSink), typeof(IImageService)];

    public static MethodInfo Find(MethodDescriptor method) =>
        s_contracts.Single(t => t.FullName == method.ServiceName).GetMethod(method.Name)!;

    /// <summary>Starts the call on <paramref name="connection"/>; the task completes with the result (boxed) or the call's exception.</summary>
    public static Task<object?> Start(RpcConnection connection, MethodDescriptor method)
    {
        MethodInfo info = Find(method);
        object proxy = CreateProxy(info.DeclaringType!, new SharedMemoryInvoker(connection, ConnectionRig.Serializer));
        object?[] arguments = info.GetParameters().Select(p => Argument(p.ParameterType, connection)).ToArray();
        object? returned;
        try
        {
            returned = info.Invoke(proxy, arguments);
        }
        catch (TargetInvocationException ex)
        {
            return Task.FromException<object?>(ex.InnerException!);
        }

        return AsTask(returned!);
    }

    /// <summary>Whether a result of type <paramref name="type"/> travels as a payload (a buffer of unmanaged items, or a lease).</summary>
    public static bool IsBuffer(Type type)
    {
        if (type == typeof(SharedBuffer))
        {
            return true;
        }

        Type? item = type.IsArray ? type.GetElementType()
            : type.IsGenericType && (type.GetGenericTypeDefinition() == typeof(ReadOnlyMemory<>) || type.GetGenericTypeDefinition() == typeof(Memory<>)) ? type.GetGenericArguments()[0]
            : null;
        return item is not null && item.IsValueType && !(bool)typeof(RuntimeHelpers).GetMethod(nameof(RuntimeHelpers.IsReferenceOrContainsReferences))!.MakeGenericMethod(item).Invoke(null, null)!;
    }

    /// <summary>The result type of a contract method (null for Task / ValueTask).</summary>
    public static Type? ResultType(MethodInfo method) =>
        method.ReturnType.IsGenericType ? method.ReturnType.GetGenericArguments()[0] : null;

    private static object CreateProxy(Type contract, CallInvoker invoker)
    {
        object descriptor = typeof(ServiceRegistry).GetMethod("Find", BindingFlags.NonPublic | BindingFlags.Static)!.MakeGenericMethod(contract).Invoke(null, null)!;
        return descriptor.GetType().GetMethod("CreateProxy", BindingFlags.NonPublic | BindingFlags.Instance)!.Invoke(descriptor, [invoker])!;
    }

    private static object? Argument(Type type, RpcConnection connection)
    {
        if (type == typeof(string))
        {
            return "x";
        }

        if (type == typeof(SharedBuffer))
        {
            return connection.Rent(16);
        }

        if (type == typeof(Stream))
        {
            return new MemoryStream([1, 2, 3]);
        }

        if (type == typeof(IAsyncEnumerable<ReadOnlyMemory<byte>>))
        {
            return Chunks();
        }

        if (type.IsArray)
        {
            return Array.CreateInstance(type.GetElementType()!, 1);
        }

        if (type.IsValueType || type.GetConstructor(Type.EmptyTypes) is not null)
        {
            return Activator.CreateInstance(type);
        }

        return null;
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<byte>> Chunks()
    {
        await Task.Yield();
        yield return new byte[] { 1, 2, 3 };
    }

    private static async Task<object?> AsTask(object returned)
    {
        switch (returned)
        {
            case Task task:
                await task.ConfigureAwait(false);
                return task.GetType().IsGenericType ? task.GetType().GetProperty("Result")!.GetValue(task) : null;
            case ValueTask valueTask:
                await valueTask.ConfigureAwait(false);
                return null;
            default:
                var asTask = (Task)returned.GetType().GetMethod("AsTask")!.Invoke(returned, null)!;
                await asTask.ConfigureAwait(false);
                return asTask.GetType().GetProperty("Result")!.GetValue(asTask);
        }
    }
}
